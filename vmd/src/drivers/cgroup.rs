//! CPU time and memory of a unit, read on request from its cgroup.
//!
//! systemd emits no signal when `CPUUsageNSec` or `MemoryCurrent` change,
//! so the live model cannot hold them; asking systemd on every read costs
//! a bus round trip and systemd's CPU. The kernel keeps the same numbers in
//! the unit's cgroup (v2, the unified hierarchy): `cpu.stat`'s
//! `usage_usec`, `memory.current` and `pids.current`. Reading them is a few
//! small local files per VM and wakes no other process. `cgroup.events`
//! also tells whether the unit is frozen: systemd up to v255 sends no
//! signal when someone else freezes a unit (systemd issue 31115), so a
//! read shows it even where no `Watch` was woken.
//!
//! On a hybrid host (cgroup v1 controllers, v2 mounted at
//! `/sys/fs/cgroup/unified` without the memory controller) `memory.current`
//! is missing: memory in use is then the resident set of the cgroup's
//! processes (`cgroup.procs`, `/proc/<pid>/status` `VmRSS`), which the
//! kernel reports in vmd's own PID namespace.

use std::path::{Component, Path, PathBuf};

/// Where the unified cgroup hierarchy is normally mounted.
const UNIFIED: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// What a unit's cgroup says it uses; `None` for what cannot be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time of every process in it, in nanoseconds.
    pub cpu_ns: Option<u64>,
    /// Memory in use, in bytes.
    pub memory: Option<u64>,
    /// Tasks (threads) in it.
    pub tasks: Option<u64>,
    /// Its processes are frozen (`cgroup.events` `frozen 1`).
    pub frozen: Option<bool>,
}

/// The unified cgroup hierarchy vmd reads units' usage from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroups {
    root: Option<PathBuf>,
    proc_root: PathBuf,
}

impl Cgroups {
    /// The hierarchy at `root` (where systemd's `ControlGroup` paths are
    /// relative to), `None` for none: usage then reads unknown.
    pub fn at(root: Option<PathBuf>) -> Self {
        Self {
            root,
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// The unified hierarchy of this host: `/sys/fs/cgroup` on a
    /// cgroup-v2 host, `/sys/fs/cgroup/unified` on a hybrid one.
    pub fn detect() -> Self {
        let root = UNIFIED
            .iter()
            .map(PathBuf::from)
            .find(|dir| dir.join("cgroup.procs").exists());
        Self::at(root)
    }

    /// The hierarchy's root, if there is one.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// What the cgroup `control_group` (systemd's `ControlGroup`, e.g.
    /// `/system.slice/system-microvm.slice/microvm@a.service`) uses now.
    pub fn usage(&self, control_group: &str) -> Usage {
        let Some(dir) = self.dir(control_group) else {
            return Usage::default();
        };
        let cpu_ns = read(&dir.join("cpu.stat"))
            .and_then(|text| field(&text, "usage_usec"))
            .map(|usec| usec.saturating_mul(1000));
        let memory = read(&dir.join("memory.current"))
            .and_then(|text| text.trim().parse().ok())
            .or_else(|| self.resident(&dir));
        let tasks = read(&dir.join("pids.current"))
            .and_then(|text| text.trim().parse().ok())
            .or_else(|| read(&dir.join("cgroup.threads")).map(|t| t.lines().count() as u64));
        let frozen = frozen_in(&dir);
        Usage {
            cpu_ns,
            memory,
            tasks,
            frozen,
        }
    }

    /// Whether the cgroup's processes are frozen now (one small read).
    pub fn frozen(&self, control_group: &str) -> Option<bool> {
        frozen_in(&self.dir(control_group)?)
    }

    /// The cgroup's `cgroup.events` file, which the kernel marks modified
    /// when the cgroup freezes, thaws or empties.
    pub fn events_file(&self, control_group: &str) -> Option<PathBuf> {
        Some(self.dir(control_group)?.join("cgroup.events"))
    }

    /// The cgroup's directory; `None` for a path that would leave the
    /// hierarchy.
    fn dir(&self, control_group: &str) -> Option<PathBuf> {
        let root = self.root.as_deref()?;
        let relative = Path::new(control_group.strip_prefix('/')?);
        relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
            .then(|| root.join(relative))
    }

    /// The summed `VmRSS` of the cgroup's processes, in bytes.
    fn resident(&self, dir: &Path) -> Option<u64> {
        let procs = read(&dir.join("cgroup.procs"))?;
        let mut total = 0u64;
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let status = read(&self.proc_root.join(pid.to_string()).join("status"));
            let kib = status.and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            });
            total = total.saturating_add(kib.unwrap_or(0).saturating_mul(1024));
        }
        Some(total)
    }
}

/// `cgroup.events`' `frozen` field.
fn frozen_in(dir: &Path) -> Option<bool> {
    read(&dir.join("cgroup.events"))
        .and_then(|text| field(&text, "frozen"))
        .map(|f| f == 1)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The value of `key` in a flat-keyed file (`usage_usec 1234`).
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn usage_comes_from_the_cgroup_files() {
        let dir = tempfile::tempdir().expect("dir");
        let cg = dir.path().join("system.slice/microvm@a.service");
        write(
            &cg.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        );
        write(&cg.join("memory.current"), "4096\n");
        write(&cg.join("pids.current"), "3\n");
        write(&cg.join("cgroup.events"), "populated 1\nfrozen 1\n");
        let cgroups = Cgroups::at(Some(dir.path().to_owned()));
        assert_eq!(
            cgroups.usage("/system.slice/microvm@a.service"),
            Usage {
                cpu_ns: Some(1_500_000),
                memory: Some(4096),
                tasks: Some(3),
                frozen: Some(true),
            }
        );
    }

    #[test]
    fn without_memory_current_the_processes_resident_sets_count() {
        let dir = tempfile::tempdir().expect("dir");
        let cg = dir.path().join("cg/x.service");
        write(&cg.join("cpu.stat"), "usage_usec 7\n");
        write(&cg.join("cgroup.procs"), "10\n11\n");
        write(&cg.join("cgroup.threads"), "10\n11\n12\n");
        let proc_root = dir.path().join("proc");
        write(
            &proc_root.join("10/status"),
            "Name:\tqemu\nVmRSS:\t    100 kB\n",
        );
        write(
            &proc_root.join("11/status"),
            "Name:\tsh\nVmRSS:\t      4 kB\n",
        );
        let cgroups = Cgroups {
            root: Some(dir.path().join("cg")),
            proc_root,
        };
        let usage = cgroups.usage("/x.service");
        assert_eq!(usage.memory, Some(104 * 1024));
        assert_eq!(usage.tasks, Some(3));
        assert_eq!(usage.cpu_ns, Some(7000));
    }

    #[test]
    fn paths_cannot_leave_the_hierarchy_and_missing_reads_unknown() {
        let dir = tempfile::tempdir().expect("dir");
        let cgroups = Cgroups::at(Some(dir.path().to_owned()));
        assert_eq!(cgroups.usage("/../etc"), Usage::default());
        assert_eq!(cgroups.usage("relative"), Usage::default());
        assert_eq!(cgroups.usage("/no/such.service"), Usage::default());
        assert_eq!(Cgroups::at(None).usage("/a.service"), Usage::default());
    }
}
