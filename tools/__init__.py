"""Developer tools that run from a checkout and are not installed: the fleet simulator
(:mod:`tools.simulator`) and the demo (:mod:`tools.demo`, what ``make demo`` runs).

They may import any installed package (agent, controller, inference, protocol); no
installed package imports them.
"""
