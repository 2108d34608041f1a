"""A protocol-level device simulator: real protocol messages over real MQTT, no camera or model.

Each :class:`~tools.simulator.device.SimulatedDevice` has its own MQTT v5 connection with the
agent's contract: a retained ``online`` status with an ``offline`` status as last will, a
retained reported state, telemetry every ``telemetry_interval_s``, events on demand. Killing
the process (SIGKILL) makes the broker publish the will, like a device losing power.

With ``ota=OtaBehaviour(...)`` a device also acts on its retained ``desired`` state as
docs/ota.md describes: a ``rev`` above the last one it handled is taken up, and each
stream whose model changes walks downloading → verifying → staging → shadow → switching
→ probation → committed (reported after each phase, with health-gate evidence from
``shadow`` on; a replacement, ``gate.compare`` false, skips ``shadow``), or fails with a
reason on demand (``fail``; in ``shadow``/``probation`` with failing evidence); a stream
absent from ``models`` goes back to its baseline. With
``download`` it really fetches the bundle and checks its size and sha256. Models in
``slow`` make its telemetry clearly worse (the controller's health comparison); ``load``
scales every device's inference latency over time, updated or not (a fleet-wide spike).
:class:`~tools.simulator.fleet.SimulatedFleet` runs many such devices over a few shared
connections (benchmarks); :class:`~tools.simulator.fleet_procs.FleetProcesses` splits such a
fleet over several processes, one interpreter lock each (``bench.rollout --sim-processes``).

:func:`~tools.simulator.load.publish_load` pushes pre-encoded telemetry of many device ids
through a few connections as fast as possible (or at a rate) for load tests and benchmarks.

Modules: ``messages`` (protocol messages a device sends), ``ota`` (OTA behaviour of one
device), ``gate`` (health-gate evidence), ``download`` (fetching and checking bundles),
``mqtt`` (connections and the step scheduler), ``device``, ``fleet``, ``fleet_procs``,
``load``, ``cli``.

Command line::

    python -m tools.simulator --broker mqtt://127.0.0.1:1883 --devices 3 --prefix sim
"""
