# initsplit — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= /usr/bin/python3
PYTEST_ARGS ?=

.PHONY: deps demo demo-modules test check bench deb

deps:
	tools/install-deps

# The main job: a Debian system booting through initsplitd in QEMU, and its journal.
# DEBIAN=13 (trixie, Linux 6.12) by default, or what INITSPLIT_DEBIAN says;
# DEBIAN=12 boots bookworm (Linux 6.1).
DEBIAN ?= $(or $(INITSPLIT_DEBIAN),13)
demo: deps
	$(PYTHON) demo/boot_demo.py --debian $(DEBIAN)

# Real Debian modules loaded plain and two-stage side by side, with the kernel's figures.
demo-modules: deps
	$(PYTHON) demo/split_demo.py

test: deps
	$(PYTHON) -m pytest -v -rfEs --durations=30 $(PYTEST_ARGS) tests

# The suite without a QEMU boot or the whole-tree corpus: every test not marked vm
# or corpus (tests/conftest.py keeps a test that boots from running unmarked).
check: deps
	$(PYTHON) -m pytest -q -rfEs -m "not vm and not corpus" $(PYTEST_ARGS) tests

bench: deps
	$(PYTHON) bench/split_tree.py

# The Debian package, initsplit_VERSION_all.deb, built with dpkg-buildpackage from a
# copy of the checkout's files (tracked and untracked, not ignored: uncommitted
# changes included) into DEBDIR (default: dist/).
DEBDIR ?= dist
deb: deps
	tools/build-deb $(DEBDIR)

# Install into DESTDIR (a Debian root, or / as root): the Python package under
# /usr/lib/initsplit, the commands, units, configuration, journal catalog, udev
# rules, the kernel hooks and the dracut module. Uses Debian's python3 and its
# python3-* packages. The Debian package (debian/rules) installs with this too.
DESTDIR ?=
LIBDIR = /usr/lib/initsplit
install:
	install -d $(DESTDIR)$(LIBDIR)/python $(DESTDIR)/usr/bin \
		$(DESTDIR)/usr/lib/systemd/system $(DESTDIR)/usr/lib/systemd/catalog \
		$(DESTDIR)/etc/initsplit/initsplitd.conf.d $(DESTDIR)/etc/udev/rules.d \
		$(DESTDIR)/usr/lib/dracut/modules.d/90initsplit $(DESTDIR)/usr/lib/dracut/dracut.conf.d \
		$(DESTDIR)/etc/kernel/postinst.d $(DESTDIR)/etc/kernel/postrm.d \
		$(DESTDIR)/usr/share/doc/initsplit
	cd daemon && find initsplit -name '*.py' -exec install -D -m 644 {} $(DESTDIR)$(LIBDIR)/python/{} \;
	install -m 755 bin/initsplitd $(DESTDIR)$(LIBDIR)/initsplitd
	install -m 755 bin/initsplitd-settle $(DESTDIR)$(LIBDIR)/initsplitd-settle
	install -m 755 bin/initsplitd-handback $(DESTDIR)$(LIBDIR)/initsplitd-handback
	install -m 755 bin/initsplit $(DESTDIR)/usr/bin/initsplit
	install -m 644 units/initsplitd.service units/initsplitd-initrd.service units/initsplitd-settle.service \
		$(DESTDIR)/usr/lib/systemd/system/
	install -m 644 conf/initsplitd.conf $(DESTDIR)/etc/initsplit/initsplitd.conf
	install -m 644 conf/initsplit.catalog $(DESTDIR)/usr/lib/systemd/catalog/initsplit.catalog
	install -m 644 udev/80-drivers.rules $(DESTDIR)/etc/udev/rules.d/80-drivers.rules
	install -m 755 dracut/90initsplit/module-setup.sh $(DESTDIR)/usr/lib/dracut/modules.d/90initsplit/
	install -m 644 dracut/90initsplit/python-closure.py $(DESTDIR)/usr/lib/dracut/modules.d/90initsplit/
	install -m 644 conf/dracut-initsplit.conf $(DESTDIR)/usr/lib/dracut/dracut.conf.d/90-initsplit.conf
	install -m 755 kernel/postinst.d/initsplit $(DESTDIR)/etc/kernel/postinst.d/initsplit
	install -m 755 kernel/postrm.d/initsplit $(DESTDIR)/etc/kernel/postrm.d/initsplit
	install -m 644 README.md $(DESTDIR)/usr/share/doc/initsplit/README.md

.PHONY: install
