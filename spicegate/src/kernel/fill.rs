//! Filling rule tables and overlays: the rules and the words of grants are
//! written straight into BPF_MAP_UPDATE_BATCH calls.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{HashMap, IterableMap, MapData};
use spicegate_common::{ENDPOINT_GEN_SHIFT, KIND_ENDPOINT, RuleKey, RuleValue};

use super::sys::{self, ENOTSUPP, map_update};
use crate::compile::Compiled;

type RuleTable = HashMap<MapData, RuleKey, RuleValue>;

/// Entries per BPF_MAP_UPDATE_BATCH call: large enough that syscall costs
/// vanish, small enough to keep the two staging arrays in cache.
const BATCH: usize = 4096;

/// From how many words of grants [`fill`] uses a second thread (the
/// kernel locks the hash map per bucket, so two writers do not wait for
/// each other).
const PARALLEL_FILL: usize = 16 * 1024;

/// Fills a fresh table with the rules of `compiled` and its `words` of
/// grants ([`Compiled::grant_words`]); its endpoint entries carry
/// `generation`.
pub fn fill(
    table: &mut RuleTable,
    compiled: &Compiled,
    words: &[(RuleKey, RuleValue)],
    generation: u32,
) -> io::Result<()> {
    let fd = IterableMap::map(table).fd().as_fd().as_raw_fd();
    let tagged = compiled.rules.iter().map(|(k, v)| {
        let mut v = *v;
        if k.kind == KIND_ENDPOINT {
            v.flags |= generation << ENDPOINT_GEN_SHIFT;
        }
        (*k, v)
    });
    if words.len() < PARALLEL_FILL {
        return write_all(fd, tagged.chain(words.iter().copied()));
    }
    let (first, second) = words.split_at(words.len() / 2);
    std::thread::scope(|s| {
        let other = s.spawn(|| write_all(fd, second.iter().copied()));
        let mine = write_all(fd, tagged.chain(first.iter().copied()));
        let other = other
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the filling thread panicked")));
        mine.and(other)
    })
}

/// Writes every entry: in batches where the kernel has
/// BPF_MAP_UPDATE_BATCH for hash maps (5.6+), one update per entry if not.
fn write_all(fd: i32, entries: impl Iterator<Item = (RuleKey, RuleValue)>) -> io::Result<()> {
    let mut keys: Vec<RuleKey> = Vec::with_capacity(BATCH);
    let mut values: Vec<RuleValue> = Vec::with_capacity(BATCH);
    let mut batched = true;
    let mut flush = |keys: &mut Vec<RuleKey>, values: &mut Vec<RuleValue>| -> io::Result<()> {
        if batched {
            match map_update_batch(fd, keys, values) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
                    log::debug!("BPF_MAP_UPDATE_BATCH unavailable ({e}); filling one by one");
                    batched = false;
                }
                Err(e) => return Err(e),
            }
        }
        if !batched {
            for (k, v) in keys.iter().zip(values.iter()) {
                map_update(fd, k, v)?;
            }
        }
        keys.clear();
        values.clear();
        Ok(())
    };
    for (k, v) in entries {
        keys.push(k);
        values.push(v);
        if keys.len() == BATCH {
            flush(&mut keys, &mut values)?;
        }
    }
    if !keys.is_empty() {
        flush(&mut keys, &mut values)?;
    }
    Ok(())
}

/// Inserts `keys[i] -> values[i]` with BPF_MAP_UPDATE_BATCH, calling
/// again until every entry is in.
fn map_update_batch(fd: i32, keys: &[RuleKey], values: &[RuleValue]) -> io::Result<()> {
    debug_assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let (n, result) = sys::map_update_batch(fd, &keys[done..], &values[done..]);
        result?;
        if n == 0 {
            return Err(io::Error::other("BPF_MAP_UPDATE_BATCH made no progress"));
        }
        done += n;
    }
    Ok(())
}
