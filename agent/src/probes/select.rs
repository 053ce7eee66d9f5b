//! Loading the kernel's process filters (agent-ebpf `probes/select.rs`): command names,
//! cgroups, and processes user space excluded, written into their maps before the
//! socket hooks attach.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use agent_common::{maps, select};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};

use super::{ProbeError, TRACEFS, attach_tp};

/// What the kernel is to filter.
#[derive(Clone, Debug, Default)]
pub struct KernelSelection {
    /// Command names never traced (cut to the kernel's 15 bytes).
    pub exclude_comms: Vec<String>,
    /// cgroup v2 directories: only their processes (and those below) are traced.
    pub cgroups: Vec<PathBuf>,
    /// Processes excluded from the start (those running now that a rule excludes).
    pub excluded_pids: Vec<u32>,
    /// User space may exclude more processes later (config file rules).
    pub user_rules: bool,
}

impl KernelSelection {
    /// The `select::*` flags for the programs' settings.
    pub fn flags(&self) -> u32 {
        let mut flags = 0;
        if !self.exclude_comms.is_empty() || !self.excluded_pids.is_empty() || self.user_rules {
            flags |= select::EXCLUDED;
        }
        if !self.exclude_comms.is_empty() {
            flags |= select::COMMS;
        }
        if !self.cgroups.is_empty() {
            flags |= select::CGROUPS;
        }
        flags
    }
}

/// The kernel's name for a command: NUL-padded, at most 15 bytes.
pub fn comm_key(name: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    let n = name.len().min(15);
    key[..n].copy_from_slice(&name.as_bytes()[..n]);
    key
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The id the kernel gives a cgroup v2 directory (its inode number).
pub fn cgroup_id(path: &Path) -> Result<u64, ProbeError> {
    let bad = |why: String| ProbeError::Cgroup {
        path: path.to_owned(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".into()));
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| bad("the path holds a NUL byte".into()))?;
    // SAFETY: `c_path` is a NUL-terminated path and `fs` a statfs for the call to fill.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        return Err(bad(std::io::Error::last_os_error().to_string()));
    }
    if fs.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(bad(
            "not in a cgroup v2 file system (on hybrid layouts it is mounted at /sys/fs/cgroup/unified)"
                .into(),
        ));
    }
    Ok(meta.ino())
}

/// Offset of `child_pid` in the sched_process_fork record, from its format file.
fn fork_child_pid_offset() -> Result<u32, ProbeError> {
    let path = Path::new(TRACEFS).join("events/sched/sched_process_fork/format");
    let text = std::fs::read_to_string(&path).map_err(|e| ProbeError::TracepointFormat {
        path: path.clone(),
        why: e.to_string(),
    })?;
    text.lines()
        .find(|l| l.contains(" child_pid;"))
        .and_then(|l| {
            l.split("offset:")
                .nth(1)?
                .split(';')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .ok_or(ProbeError::TracepointFormat {
            path,
            why: "no child_pid field".into(),
        })
}

/// The settings the programs need for `selection`: its flags and the fork record's layout.
pub fn settings(selection: &KernelSelection) -> Result<(u32, u32), ProbeError> {
    let flags = selection.flags();
    let offset = if flags & select::EXCLUDED != 0 {
        fork_child_pid_offset()?
    } else {
        0
    };
    Ok((flags, offset))
}

/// Fills the filter maps and attaches the exec and fork hooks that keep
/// `EXCLUDED_TGIDS` up to date. Returns that map when user space may add to it.
pub fn load(
    ebpf: &mut Ebpf,
    selection: &KernelSelection,
) -> Result<Option<BpfHashMap<MapData, u32, u8>>, ProbeError> {
    let map_err = |name| move |source| ProbeError::Map { name, source };
    let flags = selection.flags();
    if flags & select::COMMS != 0 {
        let mut comms: BpfHashMap<_, [u8; 16], u8> = BpfHashMap::try_from(
            ebpf.map_mut(maps::EXCLUDED_COMMS)
                .ok_or(ProbeError::MissingMap(maps::EXCLUDED_COMMS))?,
        )
        .map_err(map_err(maps::EXCLUDED_COMMS))?;
        for name in &selection.exclude_comms {
            comms
                .insert(comm_key(name), 1, 0)
                .map_err(map_err(maps::EXCLUDED_COMMS))?;
        }
    }
    if flags & select::CGROUPS != 0 {
        let mut cgroups: BpfHashMap<_, u64, u8> = BpfHashMap::try_from(
            ebpf.map_mut(maps::CGROUPS)
                .ok_or(ProbeError::MissingMap(maps::CGROUPS))?,
        )
        .map_err(map_err(maps::CGROUPS))?;
        for path in &selection.cgroups {
            cgroups
                .insert(cgroup_id(path)?, 1, 0)
                .map_err(map_err(maps::CGROUPS))?;
        }
    }
    if flags & select::EXCLUDED == 0 {
        return Ok(None);
    }
    let map = ebpf
        .take_map(maps::EXCLUDED_TGIDS)
        .ok_or(ProbeError::MissingMap(maps::EXCLUDED_TGIDS))?;
    let mut excluded: BpfHashMap<_, u32, u8> =
        BpfHashMap::try_from(map).map_err(map_err(maps::EXCLUDED_TGIDS))?;
    for pid in &selection.excluded_pids {
        excluded
            .insert(pid, 1, 0)
            .map_err(map_err(maps::EXCLUDED_TGIDS))?;
    }
    attach_tp(ebpf, "select_exec", "sched", &["sched_process_exec"])?;
    attach_tp(ebpf, "select_fork", "sched", &["sched_process_fork"])?;
    Ok(Some(excluded))
}
