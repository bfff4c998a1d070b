#!/bin/bash
# This file is part of initsplit.
# SPDX-License-Identifier: GPL-2.0-only
#
# dracut module: initsplitd in the initramfs. udev reports the devices, initsplitd
# loads their drivers two-stage (a core module and a temporary NAME__init module)
# and deletes the init modules once boot goes quiet, or at the latest when
# initrd-switch-root.target stops it.
#
# Only included when asked for: /usr/lib/dracut/dracut.conf.d/90-initsplit.conf
# (installed by initsplit) says add_dracutmodules+=" initsplit ".
#
# What goes into the image:
#   * python3 with only the part of the standard library the daemon imports, the
#     python3-pyudev/-pyelftools/-systemd packages and every shared library those
#     open (python-closure.py, run with the image's own python3, lists them);
#   * the daemon (/usr/lib/initsplit), initsplitd-initrd.service enabled in
#     sysinit.target.wants, initsplitd-settle.service (the root is mounted only
#     once the daemon's loads are done), /etc/initsplit, the journal catalog,
#     and initsplit's 80-drivers.rules (/etc/udev/rules.d, or linked at udev's
#     own path under the Debian package's diversion: udev leaves module
#     loading to the daemon while it runs);
#   * the pre-split cache: every kernel module in the image split ahead of time
#     into /usr/lib/initsplit/cache/$kernel, so the daemon never has to split (nor
#     import pyelftools) at boot, signed as [Signing] in initsplitd.conf says (by
#     default with DKMS's MOK or initsplit's own key, when one exists) so that a
#     kernel enforcing module signatures (Secure Boot) loads the splits. The
#     signing happens here, on the host; the private key is never copied into
#     the image (only *.conf files of /etc/initsplit are, and they hold paths).

initsplit_libdir=/usr/lib/initsplit
initsplit_python=/usr/bin/python3
initsplit_bin=/usr/bin/initsplit

# Prerequisite check(s) for module.
check() {
    # Without the interpreter or the daemon the module can't be installed.
    require_binaries "$initsplit_python" "$initsplit_libdir"/initsplitd /usr/bin/initsplit || return 1

    # Return 255 to only include the module when asked for (add_dracutmodules).
    return 255
}

# Module dependency requirements.
depends() {
    # systemd runs the daemon (Type=notify) and journald, which takes its
    # entries; udev-rules brings systemd-udevd, which feeds it devices (and
    # whose 80-drivers.rules initsplit's overrides); kernel-modules brings
    # modprobe, its configuration and the modules.* indexes libkmod reads.
    # (Not systemd-udevd/systemd-journald: they add hwdb.bin and units the
    # daemon does not need, ~10 MB.)
    echo systemd udev-rules kernel-modules
    return 0
}

# kB -> MB with one decimal.
_initsplit_mb() {
    printf '%d.%d' $(($1 / 1024)) $((($1 % 1024) * 10 / 1024))
}

# "FILES KB" of what initsplit added: the files install() put into the image that
# were not there yet ($initsplit_new), without the shared libraries that the
# image's other executables link anyway (dracut resolves those only later, so at
# install() time libc & co. still looked new).
_initsplit_added() {
    local _f _lib _kb=0 _n=0
    local -A _mine _shared
    while IFS= read -r _f; do
        _mine[$_f]=1
    done < "$initsplit_new"
    while IFS= read -r -d '' _f; do
        _f=${_f#"$initdir"}
        [[ ${_mine[$_f]} ]] && continue
        while IFS= read -r _lib; do
            _shared[$(readlink -f "$_lib")]=1
        done < <(ldd "$_f" 2> /dev/null | sed -n -e 's|.*=> \(/[^ ]*\) (.*|\1|p' -e 's|^\s*\(/[^ ]*\) (.*|\1|p')
    done < <(find "$initdir" -type f -perm /0111 ! -name '*.ko' ! -name '*.ko.*' -print0)
    for _f in "${!_mine[@]}"; do
        [[ ${_shared[$(readlink -f "$_f")]} ]] && continue
        _kb=$((_kb + ($(stat -L -c %s "${initdir}${_f}") + 1023) / 1024))
        _n=$((_n + 1))
    done
    echo "$_n $_kb"
}

# Split every kernel module the image holds into the pre-split cache, then report
# what initsplit added. Runs right after dracut_kernel_post (see install()).
# The modules are NAME.ko (Debian 12) or as Kbuild compressed them, NAME.ko.xz
# (Debian 13; dracut copies them as they are): the cache holds NAME.ko either way.
# ${initdir}/lib/modules is where dracut installs them, on a usrmerged image too
# (there lib is a symlink to usr/lib).
_initsplit_split_cache() {
    local _cache="$initsplit_libdir/cache/$kernel" _n _kb _cache_kb _cache_n _line _rc
    if [[ -d ${initdir}/lib/modules/$kernel ]] \
        && [[ -n $(find "${initdir}/lib/modules/$kernel/" \( -name '*.ko' -o -name '*.ko.gz' \
            -o -name '*.ko.xz' -o -name '*.ko.zst' \) -print -quit) ]]; then
        # The modules are read in place; the cache goes beside them, so depmod's
        # files (modules.dep, ...) stay exactly as dracut_kernel_post wrote them.
        # Exit 1 only means some module failed validation: that one is loaded plain.
        # Exit 2 is a signing problem (Sign=yes without a key, a configured key
        # missing, not root-only or not the certificate's, openssl failing) or
        # another error that leaves no usable cache. That must not cost the
        # machine its initramfs (dracut runs from the kernel's postinst and from
        # update-initramfs): warn and build the image without a pre-split cache.
        # Not an unsigned one: the configuration asked for signed modules, and an
        # enforcing kernel would refuse unsigned splits anyway. Without a cache the
        # daemon loads plain (enforcing kernel) or splits on the fly (boots slower),
        # as before initsplit had one; the next dracut run, once the key is
        # fixed, builds it.
        # The split's own lines carry the "initsplit: " prefix already.
        "$initsplit_bin" split "${initdir}/lib/modules/$kernel" \
            -o "${initdir}${_cache}" --quiet --sign-configured 2>&1 \
            | while read -r _line; do dwarn "initsplit: ${_line#initsplit: }"; done
        _rc=${PIPESTATUS[0]}
        if ((_rc > 1)); then
            dwarn "initsplit: splitting the modules in ${initdir}/lib/modules/$kernel failed (exit $_rc): the image gets no pre-split cache"
            rm -rf -- "${initdir}${_cache}"
        fi
    fi
    read -r _n _kb < <(_initsplit_added)
    _cache_kb=$(du -sk "${initdir}${initsplit_libdir}/cache" 2> /dev/null | cut -f1)
    _cache_kb=${_cache_kb:-0}
    _cache_n=$(find "${initdir}${initsplit_libdir}/cache" -type f 2> /dev/null | wc -l)
    dinfo "initsplit: $((_n + _cache_n)) files, $(_initsplit_mb $((_kb + _cache_kb))) MB added (python $(_initsplit_mb "$_kb") MB, cache $(_initsplit_mb "$_cache_kb") MB)"
}

# Install the required file(s) and directories for the module in the initramfs.
install() {
    local _closure="${DRACUT_TMPDIR}/initsplit-closure" _f
    local -a _files

    if [[ $dracutsysrootdir ]]; then
        # python-closure.py must run with the image's own interpreter.
        dfatal "initsplit: building from a --sysroot is not supported"
        exit 1
    fi

    # 1. python3 and what the daemon imports. The list has the interpreter, the
    #    modules, whole pyudev/systemd/elftools packages and the shared libraries
    #    (ctypes' libkmod.so.2 and libudev.so.1, libsystemd.so.0, libffi, libc).
    #    --bytecode adds the __pycache__ files: without them each boot compiles
    #    ~230 modules in the initramfs, which costs seconds on a slow machine.
    if ! "$initsplit_python" -I "$moddir"/python-closure.py --libdir "$initsplit_libdir"/python \
        --bytecode > "$_closure"; then
        dfatal "initsplit: cannot work out the daemon's Python files (python-closure.py failed)"
        exit 1
    fi
    # The daemon itself: its package's modules are in the list (python-closure.py
    # imports all of them but the command line and its reports), its scripts here.
    printf '%s\n' "$initsplit_libdir"/initsplitd "$initsplit_libdir"/initsplitd-settle \
        "$initsplit_libdir"/initsplitd-handback >> "$_closure"
    sort -u -o "$_closure" "$_closure"
    initsplit_new="${DRACUT_TMPDIR}/initsplit-new"
    while IFS= read -r _f; do
        [[ -e ${initdir}${_f} || -L ${initdir}${_f} ]] || printf '%s\n' "$_f"
    done < "$_closure" > "$initsplit_new"

    mapfile -t _files < "$_closure"
    inst_multiple "${_files[@]}" || {
        dfatal "initsplit: installing the daemon's files failed"
        exit 1
    }
    # dracut scans executable files for #! interpreters and libraries; Python
    # sources need neither (some stdlib files are 0755 and name
    # /usr/local/bin/python, which only produces errors).
    for _f in "${_files[@]}"; do
        [[ $_f == *.py ]] && chmod a-x "${initdir}${_f}"
    done
    # initsplit's own package ships no bytecode (make install copies sources);
    # compile it in the image so the daemon starts as fast as the stdlib does.
    "$initsplit_python" -I -m compileall -q -j 0 \
        -s "$initdir" -p / "${initdir}${initsplit_libdir}/python" > /dev/null \
        || dwarn "initsplit: could not compile the daemon's bytecode"
    find "${initdir}${initsplit_libdir}/python" -name '*.pyc' -newer "$initsplit_new" \
        | sed "s|^${initdir}||" >> "$initsplit_new"

    # 2. The units, enabled per their [Install] sections: the daemon
    #    (sysinit.target) and the wait for its loads before the root is mounted
    #    (initrd-root-fs.target), which also makes the root's file system driver
    #    a two-stage load of the daemon's rather than the kernel's own modprobe call.
    inst_multiple "$systemdsystemunitdir"/initsplitd-initrd.service \
        "$systemdsystemunitdir"/initsplitd-settle.service
    $SYSTEMCTL -q --root "$initdir" enable initsplitd-initrd.service initsplitd-settle.service

    # 3. Configuration (read once, here: a change needs a new image), the journal
    #    catalog and the udev rules that hand module loading to the daemon while
    #    /run/initsplit/active exists.
    inst_multiple -o \
        /etc/initsplit/initsplitd.conf \
        "/etc/initsplit/initsplitd.conf.d/*.conf" \
        "$initsplit_libdir/initsplitd.conf.d/*.conf" \
        "$systemdutildir"/catalog/initsplit.catalog
    # make install puts initsplit's rule into /etc/udev/rules.d; the Debian
    # package puts it in place of udev's own (udev's file diverted, a symlink to
    # /usr/lib/initsplit/udev/80-drivers.rules at its name), where inst_rules
    # finds it and installs the link and its target.
    if [[ -e /etc/udev/rules.d/80-drivers.rules ]]; then
        inst_simple /etc/udev/rules.d/80-drivers.rules
    else
        inst_rules 80-drivers.rules
    fi

    # 4. The pre-split cache. The kernel modules are not all here yet: dracut runs
    #    each module's installkernel() right after its install(), in module order
    #    (90initsplit comes before 90kernel-modules), and installs --drivers,
    #    add_drivers and filesystems after all modules, just before
    #    dracut_kernel_post() runs depmod on the final set. Split right after it.
    if declare -F dracut_kernel_post > /dev/null; then
        if ! declare -F _initsplit_dracut_kernel_post > /dev/null; then
            eval "_initsplit_dracut_kernel_post() $(declare -f dracut_kernel_post | tail -n +2)"
            dracut_kernel_post() {
                _initsplit_dracut_kernel_post "$@"
                _initsplit_split_cache
            }
        fi
    else
        dwarn "initsplit: dracut_kernel_post not found: only the modules installed so far are pre-split"
        _initsplit_split_cache
    fi
}
