# mailengine: `make serve` runs the engine, `make test` runs every test.
# Each target installs what is missing on a fresh Debian machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := build-essential liburing-dev libssl-dev libcrypt-dev python3-dev python3-venv \
	postfix swaks clang libclang-rt-14-dev openssl unbound iproute2 curl \
	dovecot-core dovecot-pop3d dovecot-imapd fetchmail
PY_PACKAGES := pytest pytest-timeout aiosmtplib aiosmtpd dkimpy pynacl setuptools wheel
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_SECONDS ?= 10

.PHONY: all deps venv build serve test test-unit test-asan fuzz-smoke fuzz bench clean

all: build

# System packages, only those not yet installed.
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: Makefile | deps
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PY_PACKAGES)
	touch $@

venv: $(VENV)/.installed

# The extension in place, and the `mailengine` command in .venv/bin.
build: venv
	$(PY) setup.py -q build_ext --inplace
	@[ -x $(VENV)/bin/mailengine ] || $(PIP) install -q --no-build-isolation --no-deps -e .

serve: build
	$(VENV)/bin/mailengine serve

test: build
	$(PY) -m pytest -q tests

# The same suite against an ASan+UBSan build of the extension, built in
# place (so subprocesses of the tests load it too), then put back.
ASAN_TMP := build/asan
test-asan: build
	mkdir -p $(ASAN_TMP)
	cp mailengine/_core*.so $(ASAN_TMP)/core.so.normal
	SAN_FLAGS="$(SAN_FLAGS)" $(PY) setup.py -q build_ext --inplace --force --build-temp $(ASAN_TMP)/tmp
	status=0; \
	SAN_FLAGS="$(SAN_FLAGS)" \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	MAILENGINE_ASAN=1 $(PY) -m pytest -q -p no:cacheprovider tests || status=$$?; \
	cp $(ASAN_TMP)/core.so.normal "$$(ls mailengine/_core*.so)"; exit $$status

fuzz-smoke: deps
	FUZZ_BUILD=build/fuzz bash csrc/fuzz/run.sh $(FUZZ_SECONDS)

fuzz: deps
	FUZZ_BUILD=build/fuzz bash csrc/fuzz/run.sh 300

bench: build
	$(PY) -m pip install -q aiosmtpd
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash benchmarks/run_all.sh

clean:
	rm -rf build mailengine/*.so
