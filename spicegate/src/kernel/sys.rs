//! The raw bpf(2) calls aya does not make for us, all through one
//! [`sys_bpf`].

use super::*;

/// The `u32` value at `key` of a map (for an array of maps: the id of the
/// inner map in that slot); `None` for an empty slot.
pub(super) fn map_lookup_u32(fd: i32, key: u32) -> io::Result<Option<u32>> {
    map_lookup(fd, &key)
}

/// The value at `key` of a map; `None` when the key is absent. `K` and `V`
/// must be the map's key and value types (plain data of the map's sizes).
pub(crate) fn map_lookup<K, V: Default>(fd: i32, key: &K) -> io::Result<Option<V>> {
    let mut value = V::default();
    Ok(map_lookup_into(fd, key, &mut value)?.then_some(value))
}

/// [`map_lookup`] into `value` (a large value can sit in a box): whether
/// the key was there.
pub(crate) fn map_lookup_into<K, V>(fd: i32, key: &K, value: &mut V) -> io::Result<bool> {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    #[repr(C)]
    struct LookupAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = LookupAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(value) as u64,
        flags: 0,
    };
    // SAFETY: key and value point at the caller's values of the map's key
    // and value sizes (the caller's types), which outlive the call.
    match unsafe { sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// One bpf(2) call with `attr`, the command's attribute struct; the
/// kernel reads (and for some commands writes back) `size_of::<T>()` bytes.
///
/// # Safety
/// `attr` must be the repr(C) layout the command expects, and every pointer
/// in it valid for what the command reads or writes.
pub(crate) unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: the caller vouches for attr's layout and pointers.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Makes a map read-only for `bpf()` callers (BPF_MAP_FREEZE); the
/// program, which only reads it, is unaffected.
pub(crate) fn map_freeze(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    const BPF_MAP_FREEZE: libc::c_long = 22;
    #[repr(C)]
    struct FreezeAttr {
        map_fd: u32,
        _pad: [u32; 15],
    }
    let mut attr = FreezeAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: [0; 15],
    };
    // SAFETY: bpf(BPF_MAP_FREEZE) reads `size` bytes of a valid attr.
    unsafe { sys_bpf(BPF_MAP_FREEZE, &mut attr) }.map(drop)
}

/// Inserts or replaces `key` -> `value` (BPF_MAP_UPDATE_ELEM).
///
/// `K` and `V` must be the map's key and value types: plain repr(C) data
/// of exactly the map's key and value sizes.
pub(crate) fn map_update<K, V>(fd: i32, key: &K, value: &V) -> io::Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    #[repr(C)]
    struct UpdateAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = UpdateAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_ref(value) as u64,
        flags: 0,
    };
    // SAFETY: key and value point at values of the map's key and value
    // sizes (the caller's contract) that outlive the call.
    unsafe { sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// The kernel's ENOTSUPP (524), which libc does not name.
pub(super) const ENOTSUPP: i32 = 524;

/// Inserts or replaces `keys[i] -> values[i]` with one
/// BPF_MAP_UPDATE_BATCH (hash maps: kernel 5.6+; it takes no
/// `BPF_NOEXIST`): how many went in, in order, before the first that
/// failed, and that failure. `K` and `V` as for [`map_update`].
pub(super) fn map_update_batch<K, V>(fd: i32, keys: &[K], values: &[V]) -> (usize, io::Result<()>) {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    debug_assert_eq!(keys.len(), values.len());
    let count = keys.len().min(values.len());
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: keys and values point at `count` contiguous entries of the
    // map's key and value types (the caller's contract); the kernel writes
    // back only `count`.
    let result = unsafe { sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop);
    // The kernel writes `count` back once it starts on the entries; a
    // failure before (no batch support, a bad argument) leaves it as it
    // was, and one at an entry always leaves it below that.
    let done = attr.count as usize;
    (
        if result.is_err() && done >= count {
            0
        } else {
            done
        },
        result,
    )
}

/// Deletes `key` (BPF_MAP_DELETE_ELEM); `K` as for [`map_update`].
pub(crate) fn map_delete<K>(fd: i32, key: &K) -> io::Result<()> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    #[repr(C)]
    struct DeleteAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        _rest: [u64; 2],
    }
    let mut attr = DeleteAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        _rest: [0; 2],
    };
    // SAFETY: key points at a value of the map's key size that outlives
    // the call.
    unsafe { sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr) }.map(drop)
}

/// Writes `value` at `key` of a `u32` array.
pub(super) fn map_update_u32(fd: i32, key: u32, value: u32) -> io::Result<()> {
    map_update(fd, &key, &value)
}

/// Forcibly detaches a link, even if some process still holds it open.
pub(super) fn link_detach(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    #[repr(C)]
    struct LinkDetachAttr {
        link_fd: u32,
        _pad: [u32; 15],
    }
    let mut attr = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
        _pad: [0; 15],
    };
    // SAFETY: bpf(BPF_LINK_DETACH) reads `size` bytes of a valid attr.
    unsafe { sys_bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// Opens a pinned object (BPF_OBJ_GET).
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: [u32; 11],
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: [0; 11],
    };
    // SAFETY: bpf(BPF_OBJ_GET) reads a valid attr whose path outlives the call.
    let fd = unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}
