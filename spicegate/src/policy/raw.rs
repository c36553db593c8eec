//! The policy file as written: what serde reads from the TOML.

use std::{collections::BTreeMap, fmt};

use serde::Deserialize;
use toml::Spanned;

// ---- the file as written ------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    pub(super) protect: Option<RawProtect>,
    #[serde(default)]
    pub(super) servers: BTreeMap<Spanned<String>, RawServer>,
    #[serde(default)]
    pub(super) vms: BTreeMap<Spanned<String>, RawVm>,
    #[serde(default)]
    pub(super) settings: Option<RawSettings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    #[serde(default)]
    pub(super) admins: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) end_sessions: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) resolve_interval: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) mode: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) client: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) metrics_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProtect {
    #[serde(default)]
    pub(super) ports: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    pub(super) listeners: Vec<Spanned<RawEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    #[serde(default)]
    pub(super) address: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) addresses: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVm {
    pub(super) server: Spanned<String>,
    pub(super) ports: Spanned<Vec<Spanned<toml::Value>>>,
    #[serde(default)]
    pub(super) allow: RawAllow,
    #[serde(default)]
    pub(super) schedule: Vec<RawSchedule>,
    #[serde(default)]
    pub(super) mode: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tls_port: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(super) ca_file: Option<Spanned<String>>,
}

/// An `allow` or `listeners` entry as written. A valid `#UID` is kept as
/// its number, so a policy of a million of them allocates nothing per
/// entry; anything else (names, `@group`, a malformed `#...`) as text, for
/// [`grantee`] to resolve or refuse.
pub(super) enum RawEntry {
    Uid(u32),
    Text(String),
}

impl<'de> Deserialize<'de> for RawEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl serde::de::Visitor<'_> for Entry {
            type Value = RawEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawEntry, E> {
                let uid = s
                    .trim()
                    .strip_prefix('#')
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|u| *u != u32::MAX);
                Ok(match uid {
                    Some(u) => RawEntry::Uid(u),
                    None => RawEntry::Text(s.to_owned()),
                })
            }
        }
        d.deserialize_str(Entry)
    }
}

/// A VM's `allow` list as written, in 4 bytes per `#UID` entry (what a
/// list of thousands of numeric uids is made of; parsed pieces of a large
/// policy are kept between reloads, see [`super::cache`]): the uids in the
/// order written, and the other entries each with how many uids came
/// before it.
#[derive(Default)]
pub(super) struct RawAllow {
    pub(super) uids: Vec<u32>,
    pub(super) others: Vec<(u32, Spanned<RawEntry>)>,
}

impl RawAllow {
    /// The entries in the order written.
    pub(super) fn entries(&self) -> impl Iterator<Item = RawItem<'_>> {
        let mut next_uid = 0usize;
        let mut others = self.others.iter().peekable();
        std::iter::from_fn(move || {
            if let Some((_, e)) = others.next_if(|(before, _)| *before as usize <= next_uid) {
                return Some(RawItem::Other(e));
            }
            let uid = *self.uids.get(next_uid)?;
            next_uid += 1;
            Some(RawItem::Uid(uid))
        })
    }
}

pub(super) enum RawItem<'a> {
    Uid(u32),
    Other(&'a Spanned<RawEntry>),
}

impl<'de> Deserialize<'de> for RawAllow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct List;
        impl<'de> serde::de::Visitor<'de> for List {
            type Value = RawAllow;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawAllow, A::Error> {
                let mut out = RawAllow::default();
                while let Some(e) = seq.next_element::<Spanned<RawEntry>>()? {
                    match e.get_ref() {
                        RawEntry::Uid(u) => out.uids.push(*u),
                        RawEntry::Text(_) => {
                            let before = u32::try_from(out.uids.len()).unwrap_or(u32::MAX);
                            out.others.push((before, e));
                        }
                    }
                }
                out.uids.shrink_to_fit();
                Ok(out)
            }
        }
        d.deserialize_seq(List)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    pub(super) allow: Spanned<Vec<Spanned<RawEntry>>>,
    #[serde(default)]
    pub(super) days: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub(super) hours: Option<Spanned<String>>,
}
