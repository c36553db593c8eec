use std::{
    path::Path,
    time::{Duration, Instant},
};

use super::*;
use crate::{directory::FakeDirectory, policy::parse};

fn dir() -> FakeDirectory {
    FakeDirectory::default()
        .user("anne", 1001)
        .user("bob", 1002)
        .user("tessa", 1004)
        .group("bk", &[1002, 1003])
}

fn policy(text: &str) -> Policy {
    parse(text, Path::new("p.toml"), &dir()).unwrap_or_else(|e| panic!("{e}"))
}

fn grant(uid: u32, vm: &str, expires: Option<u64>) -> TempGrant {
    TempGrant {
        uid,
        user: format!("#{uid}"),
        vm: vm.into(),
        expires,
        granted_at: 0,
        granted_by: 0,
    }
}

/// The page as (row name, [(vm, text)]).
fn texts(p: &Page) -> Vec<(String, Vec<(String, String)>)> {
    p.rows
        .iter()
        .map(|r| {
            let cells = r
                .cells
                .iter()
                .map(|c| (p.vms[c.vm].clone(), cell_text(&c.how)))
                .collect();
            (r.name(), cells)
        })
        .collect()
}

fn row(name: &str, cells: &[(&str, &str)]) -> (String, Vec<(String, String)>) {
    (
        name.into(),
        cells
            .iter()
            .map(|(v, t)| ((*v).to_owned(), (*t).to_owned()))
            .collect(),
    )
}

const LAB: &str = r##"
[vms.debianx]
server = "localhost"
ports = [20002]
allow = ["anne", "@bk", "#1021"]
[[vms.debianx.schedule]]
allow = ["anne", "tessa"]
days = ["mon", "tue"]
hours = "08:00-12:00"
[[vms.debianx.schedule]]
allow = ["tessa"]
days = ["wed"]
[vms.leaptest]
server = "localhost"
ports = [20004]
[[vms.leaptest.schedule]]
allow = ["@console"]
days = ["fri"]
hours = "22:00-06:00"
[vms.nobody]
server = "localhost"
ports = [20005]
allow = []
[vms.winlab]
server = "localhost"
ports = [5930]
allow = ["@console", "bob"]
"##;

#[test]
fn matrix_of_who_may_open_what_and_when() {
    let p = policy(LAB);
    let temp = [
        grant(1001, "winlab", Some(1_800_000_000)),
        grant(1004, "winlab", None),
        grant(1004, "debianx", None),
        grant(7, "gone", None),
    ];
    let page = page(&p, &temp, true, None, None);
    assert_eq!(page.vms, ["debianx", "leaptest", "nobody", "winlab"]);
    assert_eq!(page.next_after, None);
    assert!(page.temporary_known);
    assert_eq!(
        texts(&page),
        vec![
            row(
                "@console",
                &[
                    ("leaptest", "schedule fri 22:00-06:00"),
                    ("winlab", "console")
                ]
            ),
            // Always wins alone (anne is also in a schedule).
            row(
                "#1001",
                &[
                    ("debianx", "always"),
                    ("winlab", "temporary until 2027-01-15T08:00:00Z")
                ]
            ),
            // bob by name and through @bk: once.
            row("#1002", &[("debianx", "always"), ("winlab", "always")]),
            row("#1003", &[("debianx", "always")]),
            // Two windows, and a temporary grant besides.
            row(
                "#1004",
                &[
                    (
                        "debianx",
                        "schedule mon,tue 08:00-12:00; wed; temporary (until revoked)"
                    ),
                    ("winlab", "temporary (until revoked)")
                ]
            ),
            row("#1021", &[("debianx", "always")]),
        ],
        "a grant of a VM not in the policy is no row"
    );
    // Without a daemon, temporary grants are unknown.
    let file = super::page(&p, &[], false, None, None);
    assert!(!file.temporary_known);
    assert_eq!(texts(&file)[1], row("#1001", &[("debianx", "always")]));
}

#[test]
fn a_user_who_is_not_an_admin_sees_their_own_row() {
    let p = policy(LAB);
    let temp = [grant(1004, "winlab", None)];
    let mine = page(&p, &temp, true, None, Some(1002));
    // Columns: only the VMs of their row and the @console row.
    assert_eq!(mine.vms, ["debianx", "leaptest", "winlab"]);
    assert_eq!(
        texts(&mine),
        vec![
            row(
                "@console",
                &[
                    ("leaptest", "schedule fri 22:00-06:00"),
                    ("winlab", "console")
                ]
            ),
            row("#1002", &[("debianx", "always"), ("winlab", "always")]),
        ]
    );
    assert_eq!(mine.next_after, None);
    // One page: asking for more gives nothing.
    let more = page(&p, &temp, true, Some(1002), Some(1002));
    assert!(more.rows.is_empty(), "{more:?}");
    // Someone the policy does not name: the @console row only.
    let stranger = page(&p, &temp, true, None, Some(4242));
    assert_eq!(stranger.rows.len(), 1);
    assert_eq!(stranger.rows[0].uid, None);
    assert_eq!(stranger.vms, ["leaptest", "winlab"]);
}

#[test]
fn pages_cover_every_user_once_in_uid_order() {
    // 2,500 numeric uids (held as one sorted array) on two VMs, some on
    // both, and a temporary grant between them.
    let a: Vec<String> = (0..2000u32)
        .map(|i| format!("\"#{}\"", 50_000 + i))
        .collect();
    let b: Vec<String> = (1500..2500u32)
        .map(|i| format!("\"#{}\"", 50_000 + i))
        .collect();
    let p = policy(&format!(
        "[vms.a]\nserver=\"localhost\"\nports=[1]\nallow=[{}]\n\
         [vms.b]\nserver=\"localhost\"\nports=[2]\nallow=[{}]\n",
        a.join(","),
        b.join(",")
    ));
    let temp = [grant(51_234, "b", None), grant(99_999, "a", None)];
    let mut after = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let pg = page(&p, &temp, true, after, None);
        pages += 1;
        assert!(pg.rows.len() <= REPORT_ROWS);
        for r in &pg.rows {
            let uid = r.uid.expect("no @console here");
            let has = |vm: &str| {
                r.cells
                    .iter()
                    .find(|c| pg.vms[c.vm] == vm)
                    .map(|c| cell_text(&c.how))
            };
            let i = uid.wrapping_sub(50_000);
            assert_eq!(has("a").is_some(), i < 2000 || uid == 99_999, "{uid}");
            let want_b = if uid == 51_234 {
                Some("temporary (until revoked)".to_owned())
            } else {
                ((1500..2500).contains(&i)).then(|| "always".to_owned())
            };
            assert_eq!(has("b"), want_b, "{uid}");
            seen.push(uid);
        }
        match pg.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let want: Vec<u32> = (50_000..52_500).chain([99_999]).collect();
    assert_eq!(seen, want);
    // The last uid there is: no page after it, and no overflow.
    assert!(page(&p, &temp, true, Some(u32::MAX), None).rows.is_empty());
}

#[test]
fn many_vms_make_pages_of_fewer_rows() {
    let mut text = String::new();
    for v in 0..250 {
        let uids: Vec<String> = (0..1000).map(|i| format!("\"#{}\"", 10_000 + i)).collect();
        text.push_str(&format!(
            "[vms.v{v:03}]\nserver=\"localhost\"\nports=[{}]\nallow=[{}]\n",
            1000 + v,
            uids.join(",")
        ));
    }
    let p = policy(&text);
    let pg = page(&p, &[], true, None, None);
    assert_eq!(pg.rows.len(), REPORT_CELLS / 250);
    assert!(pg.rows.iter().all(|r| r.cells.len() == 250));
    assert_eq!(pg.next_after, Some(10_000 + 399));
}

/// 100 VMs x 10,000 users: a million grants, in pages of 1,000 users
/// (100,000 cells), each computed without going through the others.
#[test]
fn a_million_grants_come_in_bounded_pages() {
    let uids: crate::policy::Uids = (100_000..110_000u32).collect::<BTreeSet<u32>>().into();
    let mut p = policy("");
    for v in 0..100 {
        let name = format!("vm{v:03}");
        p.vms.insert(
            name.clone(),
            Vm {
                name,
                server: "localhost".into(),
                ports: vec![1000 + v],
                allow: vec![Grantee {
                    principal: Principal::Uids(10_000),
                    uids: uids.clone(),
                }],
                schedules: Vec::new(),
                mode: None,
                tls_port: None,
                ca_file: None,
            },
        );
    }
    let (mut after, mut pages, mut cells, mut slowest) = (None, 0, 0, Duration::ZERO);
    loop {
        let t = Instant::now();
        let pg = page(&p, &[], true, after, None);
        slowest = slowest.max(t.elapsed());
        pages += 1;
        assert_eq!(pg.rows.len(), REPORT_ROWS);
        cells += pg.rows.iter().map(|r| r.cells.len()).sum::<usize>();
        match pg.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    eprintln!("a million grants: {pages} pages, the slowest took {slowest:?}");
    assert_eq!((pages, cells), (10, 1_000_000));
}

#[test]
fn names_are_filled_in_from_the_directory() {
    let p = policy(LAB);
    let mut pg = page(&p, &[], false, None, None);
    let mut cache = HashMap::new();
    crate::control::fill_user_names(&mut pg, &dir(), &mut cache);
    let names: Vec<String> = pg.rows.iter().map(Row::name).collect();
    assert_eq!(
        names,
        ["@console", "anne", "bob", "#1003", "tessa", "#1021"]
    );
    assert_eq!(cache.get(&1003).map(String::as_str), Some("#1003"));
    // The wire format round-trips.
    let json = serde_json::to_string(&pg).expect("json");
    assert!(
        json.contains(r#""how":"schedule","windows":["mon,tue 08:00-12:00","wed"]"#),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<Page>(&json).expect("parses"), pg);
}
