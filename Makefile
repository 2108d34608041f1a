# edgefleet — the two commands a fresh machine needs:  make demo   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help deb test-arm64 lock demo test install-dev install-runtime mosquitto chromium promtool rtsp-deps lint typecheck pytest schemas bench clean

help:
	@echo "make demo    - set up .venv and run the demo (agent + controller on the shipped model and video)"
	@echo "make test    - set up .venv with dev tools, install Mosquitto and Chromium if missing, run ruff, mypy, pytest"
	@echo "make schemas - regenerate docs/protocol/*.schema.json and docs/config/*.schema.json"
	@echo "make deb     - build the edgefleet-agent Debian package into dist/ (ARCH=arm64: for a Pi, emulated)"
	@echo "make test-arm64 - build the arm64 package and test it in an emulated arm64 root (root, minutes)"
	@echo "make lock    - regenerate the hash-pinned lock files in requirements/ (PyPI)"
	@echo "make bench   - run the benchmarks in bench/ (ingest, pipeline, a 1,000-device rollout, hot swap, health gate, the fleet page at 10,000 devices, snapshots, local HTTP inference, the CPU cost per camera)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[agent,onnx,controller]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[dev]'
	touch $@

# tflite-runtime needs numpy < 2, so its backend is tested from its own small venv.
.venv-tflite/.done:
	$(PYTHON) -m venv .venv-tflite
	.venv-tflite/bin/pip install --quiet 'tflite-runtime==2.14.*' 'numpy<2' 'msgspec>=0.18' \
		|| echo "tflite-runtime is not available for this Python/platform; its test will say so"
	touch $@

install-runtime: $(VENV)/.runtime
install-dev: $(VENV)/.dev .venv-tflite/.done

# $(call apt_install_no_service,PACKAGES,SERVICES): install Debian packages without starting
# or enabling the services they ship (make test leaves the machine's services as it found
# them). /usr/sbin/policy-rc.d exiting 101 forbids starting any service during the install
# (one already there is set aside and put back), and SERVICES are disabled afterwards
# (systemctl edits the unit links even where systemd is not running).
POLICY_RC_D ?= /usr/sbin/policy-rc.d
define apt_install_no_service
$(SUDO) sh -c 'p=$(POLICY_RC_D); \
	[ ! -e $$p ] || mv $$p $$p.edgefleet-saved; \
	printf "#!/bin/sh\nexit 101\n" >$$p && chmod 755 $$p; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1); rc=$$?; \
	rm -f $$p; [ ! -e $$p.edgefleet-saved ] || mv $$p.edgefleet-saved $$p; \
	for s in $(2); do systemctl disable --now $$s >/dev/null 2>&1 \
		|| systemctl disable $$s >/dev/null 2>&1 || true; done; exit $$rc'
endef

mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
		echo "Installing Mosquitto (Debian package; its system service is left disabled):" \
			"the embedded broker and the tests use it"; \
		$(call apt_install_no_service,mosquitto,mosquitto); }

# The console's browser tests (tests/browser/) drive Debian's Chromium through Playwright's
# Python package (never `playwright install`: it launches /usr/bin/chromium). chromium ships
# no service, but one of its recommended packages does (upower): left disabled, not started.
chromium:
	@[ -x /usr/bin/chromium ] || { \
		echo "Installing Chromium (Debian package): the console's browser tests drive it"; \
		$(call apt_install_no_service,chromium,upower); }

# promtool checks packaging/prometheus/alerts.yml in the tests. Only its binary is taken out
# of the Debian package prometheus (apt-get download, dpkg-deb -x) into $(PROMTOOL_DIR):
# nothing is installed system-wide and no Prometheus server is enabled or started.
# make pytest puts $(PROMTOOL_DIR) first on PATH; tests/test_observability_files.py looks there.
PROMTOOL_DIR := $(VENV)/tools
promtool: $(PROMTOOL_DIR)/promtool

$(PROMTOOL_DIR)/promtool:
	@echo "Fetching promtool (the binary only, out of the Debian package prometheus)"
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	{ (cd "$$tmp" && apt-get download -qq prometheus) >/dev/null 2>&1 \
		|| { $(SUDO) apt-get update -qq && (cd "$$tmp" && apt-get download -qq prometheus); }; } && \
	dpkg-deb -x "$$tmp"/prometheus_*.deb "$$tmp/root" && mkdir -p $(@D) && \
	install -m 755 "$$tmp/root/usr/bin/promtool" $@ \
	|| echo "promtool could not be fetched; the alert-rule checks will say so"

# GStreamer's RTSP server with the system python3's GObject bindings: tests/rtsp_server.py
# serves the shipped video over RTSP to real agents (tests/test_agent_stop_rtsp.py).
RTSP_PACKAGES := python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
rtsp-deps:
	@missing=$$(for p in $(RTSP_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	[ -z "$$missing" ] || { \
		echo "Installing the RTSP test server's packages:" $$missing; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq $$missing \
		|| echo "they could not be installed; the RTSP tests will fail saying what is missing"; }

demo: $(VENV)/.runtime mosquitto
	$(PY) -m tools.demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy protocol common inference agent controller tools tests bench

# Two workers: most tests wait on brokers, agents and timers, so the suite takes about
# 9-12 minutes instead of 14 on a 2-core machine (12 on the slower AMD EPYC of
# 2026-12-07). The 15 slowest tests are listed at the end, to keep an eye on the total.
# `make pytest PYTEST_ARGS="-n 0 -x"` runs it in one process.
PYTEST_ARGS ?= -n 2 --durations=15
pytest: install-dev mosquitto chromium promtool rtsp-deps
	PATH="$(abspath $(PROMTOOL_DIR)):$$PATH:/usr/sbin" $(VENV)/bin/pytest $(PYTEST_ARGS)

test: install-dev mosquitto chromium promtool rtsp-deps lint typecheck pytest

schemas: $(VENV)/.runtime
	$(PY) -m protocol docs/protocol
	$(PY) -c 'from pathlib import Path; from agent.config import config_schema as s; from protocol.config_file import schema_text as t; Path("docs/config/agent.schema.json").write_text(t(s()))'
	$(PY) -c 'from pathlib import Path; from controller.config import config_schema as s; from protocol.config_file import schema_text as t; Path("docs/config/controller.schema.json").write_text(t(s()))'

bench: $(VENV)/.runtime
	$(PY) -m bench.pipeline
	$(PY) -m bench.ingest
	$(PY) -m bench.rollout
	$(PY) -m bench.swap
	$(PY) -m bench.gate
	$(PY) -m bench.fleet
	$(PY) -m bench.snapshots
	$(PY) -m bench.http
	$(PY) -m bench.cameras
	$(PY) -m bench.publish
	$(PY) -m bench.mqtt_reads

# The edgefleet-agent .deb (self-contained venv under /opt/edgefleet): docs/operations.md.
# Build it on the devices' Debian release and architecture; DEB_ARGS passes options on.
# Its venv installs requirements/agent.txt with --require-hashes --no-deps, then the project.
# `make deb ARCH=arm64` on x86 (root, binfmt_misc, qemu-user-static, debootstrap) builds the
# Raspberry Pi OS Bookworm 64-bit package in an emulated bookworm arm64 root instead
# (packaging/arm64/). 32-bit ARM (armhf, armv7l) is not supported: LiteRT has no wheels for it.
ARCH ?=
deb:
	@case "$(ARCH)" in \
	"" | "$$(dpkg --print-architecture)") \
		$(PYTHON) packaging/deb/build.py --out dist --lock requirements/agent.txt $(DEB_ARGS) ;; \
	arm64 | aarch64) packaging/arm64/build-deb.sh --out dist --lock requirements/agent.txt $(DEB_ARGS) ;; \
	armhf | armel | armv7l) echo "error: ARCH=$(ARCH): 32-bit ARM is not supported (LiteRT" \
		"ships no wheels for it); install a 64-bit OS on the board (Raspberry Pi OS" \
		"64-bit runs on a Pi 3, 4, 5 and Zero 2 W) and use ARCH=arm64" >&2; exit 2 ;; \
	*) echo "error: ARCH=$(ARCH): build it on a $(ARCH) machine, or use ARCH=arm64" >&2; \
		exit 2 ;; \
	esac

# The arm64 package checked under emulation (needs root and a few minutes; not part of
# `make test`): built, installed into a fresh arm64 root, check-config and infer on the
# shipped video as a Pi 4 and a Pi 5 (QEMU_CPU) compared with x86, `run` against a Mosquitto
# on the host, purged. docs/operations.md, "arm64 package".
test-arm64: $(VENV)/.runtime mosquitto
	packaging/arm64/test-arm64.sh $(abspath $(VENV))/bin/edgefleet-agent

# Hash-pinned lock files (requirements/README.md): agent.txt for the .deb (Python 3.10+, x86_64
# and aarch64: one universal resolution), controller.txt for the container image (Python 3.11).
# Resolved against PyPI only (--no-config: no local pip/uv indexes or constraints), then
# checked: every extra covered, and pip finds a wheel for every pin on every target.
# Existing pins are kept; `make lock LOCK_ARGS=--upgrade` (or --upgrade-package NAME) moves them.
UV_VERSION := 0.13.9
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --quiet --no-config \
	--index-url https://pypi.org/simple --universal --generate-hashes \
	--constraints requirements/constraints.txt --custom-compile-command 'make lock' $(LOCK_ARGS)

$(VENV)/bin/uv: | $(PY)
	$(PIP) install --quiet 'uv==$(UV_VERSION)' 'packaging>=24'

lock: $(VENV)/bin/uv
	$(UV_COMPILE) --python-version 3.10 --extra agent -o requirements/agent.txt
	$(UV_COMPILE) --python-version 3.11 --extra controller --extra postgres --extra s3 \
		-o requirements/controller.txt
	$(PY) requirements/check.py --online

clean:
	rm -rf $(VENV) .venv-tflite build *.egg-info .mypy_cache .ruff_cache .pytest_cache
