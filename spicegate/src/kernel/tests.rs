use super::{mounts::unescape_mountinfo, *};

#[test]
fn finds_cgroup2_in_hybrid_layout() {
    let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    assert_eq!(
        cgroup2_root_from(info),
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    );
}

#[test]
fn finds_cgroup2_unified_and_skips_subtree_binds() {
    let info = "\
50 1 0:40 /user.slice /mnt/bind rw - cgroup2 cgroup2 rw
29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
";
    assert_eq!(
        cgroup2_root_from(info),
        Some(PathBuf::from("/sys/fs/cgroup"))
    );
    assert_eq!(
        cgroup2_root_from("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
        None
    );
}

#[test]
fn unescapes_mount_points() {
    assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
    assert_eq!(unescape_mountinfo("/plain"), "/plain");
}

/// The embedded object's maps and programs carry exactly the names
/// spicegate-common gives them (a rename on one side only would make
/// the daemon miss a map at load, or pin it under the wrong name).
/// Needs no root: the object is parsed, not loaded.
#[test]
fn the_kernel_object_uses_the_shared_names() {
    use spicegate_common::{OVERLAY_MAP, OVERLAY_SELECT_MAP};
    if EBPF_OBJECT.is_empty() {
        eprintln!("built with SPICEGATE_SKIP_EBPF=1: no kernel object to check");
        return;
    }
    let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
    let mut maps: Vec<&str> = obj.maps.keys().map(String::as_str).collect();
    maps.sort_unstable();
    for name in [
        POLICY_MAP,
        OVERLAY_MAP,
        OVERLAY_SELECT_MAP,
        RATE_MAP,
        RATE_NAMED_MAP,
        MARKS_MAP,
        GRANTED_MAP,
        spicegate_common::MARK_SLOTS_MAP,
        spicegate_common::PORTS_MAP,
        DROPS_MAP,
        FLOOD_MAP,
        COUNTERS_MAP,
        spicegate_common::LOG_MAP,
    ] {
        assert!(
            maps.contains(&name),
            "map {name} not in the object: {maps:?}"
        );
    }
    let mut progs: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
    progs.sort_unstable();
    assert_eq!(
        progs,
        [
            PROG_BIND4,
            PROG_BIND6,
            PROG_CONNECT4,
            PROG_CONNECT6,
            PROG_RELEASE
        ],
        "programs of the object"
    );
}

#[test]
fn pin_names_carry_the_layout_version() {
    let p = PinPaths::new("/sys/fs/bpf/x");
    assert_eq!(
        p.policy(),
        PathBuf::from(format!("/sys/fs/bpf/x/policy_v{LAYOUT_VERSION}"))
    );
}

#[test]
fn maps_layout_3_kept_keep_their_layout_2_pins() {
    let p = PinPaths::new("/sys/fs/bpf/x");
    assert_eq!(p.marks(), PathBuf::from("/sys/fs/bpf/x/marks_v2"));
    assert_eq!(p.mark_slots(), PathBuf::from("/sys/fs/bpf/x/mark_slots_v2"));
    assert_eq!(p.counters(), PathBuf::from("/sys/fs/bpf/x/counters_v2"));
    assert_eq!(p.ports(), PathBuf::from("/sys/fs/bpf/x/ports_v3"));
    assert_eq!(p.link4(), PathBuf::from("/sys/fs/bpf/x/connect4_v3"));
}

/// An upgrade from layout 2 retires its table, overlays, prefilter and
/// links, and adopts the maps layout 3 kept.
#[test]
fn legacy_pins_are_what_this_layout_does_not_pin() {
    let dir = std::env::temp_dir().join(format!("sg-pins-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for name in [
        "policy_v2",
        "ports_v2",
        "connect4_v2",
        "marks_v2",
        "granted_v2",
        "policy_v3",
        "connect4_v3",
        "connect6_v3_new",
    ] {
        std::fs::write(dir.join(name), b"").expect("temp pin");
    }
    let p = PinPaths::new(&dir);
    let names = |v: Vec<PathBuf>| -> Vec<String> {
        v.iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(
        names(p.legacy_pins()),
        ["connect4_v2", "policy_v2", "ports_v2"]
    );
    assert_eq!(names(p.legacy_links()), ["connect4_v2"]);
    std::fs::remove_dir_all(&dir).expect("remove temp dir");
}
