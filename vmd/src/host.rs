//! Host facts for `Host` requests.
//!
//! [`HostProbe::probe`] never fails: a fact that cannot be read is reported
//! as unknown (`None`), empty or 0, and the cause is logged at debug level.
//!
//! Where each fact comes from (`<proc>` is the proc root, normally `/proc`;
//! `<sys>` is the `sys` directory beside it, normally `/sys`):
//!
//! | Fact | Source | When |
//! |------|--------|------|
//! | `hostname` | `<proc>/sys/kernel/hostname` | every probe |
//! | `kernel` | `<proc>/sys/kernel/osrelease` | once |
//! | `vmd_version` | the crate version at build time | constant |
//! | `uptime_secs` | first field of `<proc>/uptime` | every probe |
//! | `vmd_uptime_secs` | the `Instant` given to [`HostProbe::new`] | every probe |
//! | `cpu.vendor`, `cpu.model` | `vendor_id`, `model name` in `<proc>/cpuinfo` | once |
//! | `cpu.virt_flag` | `vmx`/`svm` in the first `flags` line of `<proc>/cpuinfo` | once |
//! | `cpu.logical_cpus` | `<sys>/devices/system/cpu/online`; if unreadable, the `processor` lines of the cached `<proc>/cpuinfo` | every probe |
//! | `memory` | `MemTotal`, `MemAvailable` in `<proc>/meminfo` | every probe |
//! | `virtualization` | ioctls on the KVM device (normally `/dev/kvm`) | until it succeeds once |
//!
//! The online-CPU list is used rather than `available_parallelism`, which
//! shrinks with the daemon's CPU affinity and cgroup quota; the host's count
//! is what an operator sizing VMs needs. It is read fresh, so CPU hot-plug
//! shows up.
//!
//! Facts that cannot change while the daemon runs are read on the first probe
//! and cached. The KVM facts are cached once they have been read
//! successfully; while KVM is unavailable every probe tries again, so loading
//! the module later is noticed without a restart.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, Kvm};
use tracing::debug;
use vmd_proto::{
    Bytes, CpuInfo, CpuTimes, HostInfo, KvmCapability, KvmInfo, MemoryInfo, VirtFlag,
    Virtualization,
};

/// The only KVM API version Linux has shipped since 2.6.22.
const SUPPORTED_KVM_API_VERSION: i32 = 12;

/// How old the facts of a [`HostProbe::recent`] answer may be.
pub const RECENT: Duration = Duration::from_secs(1);

/// The KVM device [`HostProbe::new`] opens.
const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// The proc root [`HostProbe::new`] reads.
const DEFAULT_PROC_ROOT: &str = "/proc";

/// The online-CPU list, relative to the `sys` root.
const CPU_ONLINE: &str = "devices/system/cpu/online";

/// `ENXIO` on Linux: the device node has no driver behind it.
const ENXIO: i32 = 6;
/// `ENODEV` on Linux: no such device.
const ENODEV: i32 = 19;

/// The capabilities reported in [`KvmInfo::capabilities`], in this order.
/// Some exist only on some architectures in `kvm-ioctls`.
const CAPABILITIES: &[(&str, Cap)] = &[
    ("user-memory", Cap::UserMemory),
    ("irqchip", Cap::Irqchip),
    ("hlt", Cap::Hlt),
    ("ioeventfd", Cap::Ioeventfd),
    ("irqfd", Cap::Irqfd),
    ("immediate-exit", Cap::ImmediateExit),
    #[cfg(target_arch = "x86_64")]
    ("xsave", Cap::Xsave),
    #[cfg(target_arch = "x86_64")]
    ("x2apic-api", Cap::X2ApicApi),
    ("tsc-deadline-timer", Cap::TscDeadlineTimer),
    #[cfg(target_arch = "x86_64")]
    ("split-irqchip", Cap::SplitIrqchip),
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "s390x"))]
    ("set-guest-debug", Cap::SetGuestDebug),
    ("ext-cpuid", Cap::ExtCpuid),
];

/// Answers `Host` requests.
///
/// Cheap to call repeatedly and safe to share between connections (it is
/// `Send + Sync`; wrap it in an `Arc`).
#[derive(Debug)]
pub struct HostProbe {
    /// When the daemon started.
    started: Instant,
    /// The KVM device.
    kvm_device: PathBuf,
    /// The proc root.
    proc_root: PathBuf,
    /// The online-CPU list, if the proc root has a parent to find `sys` in.
    cpu_online: Option<PathBuf>,
    /// Facts read once, on the first probe.
    fixed: OnceLock<FixedFacts>,
    /// The KVM facts, once read successfully.
    kvm: OnceLock<KvmInfo>,
    /// The last probe and when it was made, for [`HostProbe::recent`].
    last: Mutex<Option<(Instant, HostInfo)>>,
}

/// Facts that cannot change while the daemon runs.
#[derive(Debug)]
struct FixedFacts {
    /// From `cpuinfo`.
    cpu: CpuSummary,
    /// From `sys/kernel/osrelease`; empty if unreadable.
    kernel: String,
}

impl HostProbe {
    /// Probe the real host: `/dev/kvm`, `/proc` and `/sys`.
    pub fn new(started: Instant) -> Self {
        Self::with_paths(
            started,
            PathBuf::from(DEFAULT_KVM_DEVICE),
            PathBuf::from(DEFAULT_PROC_ROOT),
        )
    }

    /// Probe with other paths (tests): the KVM device and the proc root
    /// (normally `/proc`). The online-CPU list is read from the `sys`
    /// directory beside the proc root (`<proc_root>/../sys`).
    pub fn with_paths(started: Instant, kvm_device: PathBuf, proc_root: PathBuf) -> Self {
        let cpu_online = proc_root
            .parent()
            .map(|parent| parent.join("sys").join(CPU_ONLINE));
        Self {
            started,
            kvm_device,
            proc_root,
            cpu_online,
            fixed: OnceLock::new(),
            kvm: OnceLock::new(),
            last: Mutex::new(None),
        }
    }

    /// Host facts at most [`RECENT`] old: the last probe's, with the
    /// daemon's uptime brought up to date, or a new probe (module docs).
    pub fn recent(&self) -> HostInfo {
        let now = Instant::now();
        // Only whole values are stored: a poisoned lock is consistent.
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, info)) = last.as_ref()
            && now.saturating_duration_since(*at) < RECENT
        {
            let mut info = info.clone();
            info.vmd_uptime_secs = self.started.elapsed().as_secs();
            return info;
        }
        drop(last);
        let info = self.probe();
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some((now, info.clone()));
        info
    }

    /// Current host facts. Never fails: a fact that cannot be read is
    /// reported as unknown, empty or 0 and logged at debug level; a missing
    /// or unusable KVM gives [`Virtualization::Unavailable`] with a reason an
    /// operator can act on.
    pub fn probe(&self) -> HostInfo {
        let fixed = self.fixed.get_or_init(|| self.read_fixed_facts());
        HostInfo {
            hostname: self.read_hostname(),
            kernel: fixed.kernel.clone(),
            vmd_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.read_uptime(),
            vmd_uptime_secs: self.started.elapsed().as_secs(),
            cpu: CpuInfo {
                vendor: fixed.cpu.vendor.clone(),
                model: fixed.cpu.model.clone(),
                logical_cpus: self.logical_cpus(&fixed.cpu),
                virt_flag: fixed.cpu.virt_flag,
            },
            memory: self.read_memory(),
            virtualization: self.virtualization(),
            load_milli: read_text(&self.proc_root.join("loadavg"))
                .and_then(|text| parse_loadavg(&text))
                .unwrap_or_default(),
            cpu_times: read_text(&self.proc_root.join("stat")).and_then(|text| parse_stat(&text)),
        }
    }

    /// Reads the facts cached for the daemon's lifetime.
    fn read_fixed_facts(&self) -> FixedFacts {
        let cpu = read_text(&self.proc_root.join("cpuinfo"))
            .map(|text| parse_cpuinfo(&text))
            .unwrap_or_default();
        let kernel = read_text(&self.proc_root.join("sys/kernel/osrelease"))
            .map(|text| text.trim().to_owned())
            .unwrap_or_default();
        FixedFacts { cpu, kernel }
    }

    /// The host name, or empty if unreadable.
    fn read_hostname(&self) -> String {
        read_text(&self.proc_root.join("sys/kernel/hostname"))
            .map(|text| text.trim().to_owned())
            .unwrap_or_default()
    }

    /// Seconds since boot, or 0 if unreadable.
    fn read_uptime(&self) -> u64 {
        let path = self.proc_root.join("uptime");
        let Some(text) = read_text(&path) else {
            return 0;
        };
        parse_uptime(&text).unwrap_or_else(|| {
            debug!(path = %path.display(), "unparsable uptime");
            0
        })
    }

    /// Logical CPUs online: the online list, else the cached `processor`
    /// count, else 0.
    fn logical_cpus(&self, cpu: &CpuSummary) -> u32 {
        if let Some(path) = &self.cpu_online
            && let Some(text) = read_text(path)
        {
            match parse_cpu_list(&text) {
                Some(n) => return n,
                None => debug!(path = %path.display(), "unparsable online CPU list"),
            }
        }
        cpu.processors
    }

    /// `MemTotal` and `MemAvailable`; 0 for either that is unreadable.
    fn read_memory(&self) -> MemoryInfo {
        let path = self.proc_root.join("meminfo");
        let mem = read_text(&path)
            .map(|text| parse_meminfo(&text))
            .unwrap_or_default();
        if mem.total.is_none() || mem.available.is_none() {
            debug!(path = %path.display(), ?mem, "meminfo lacks MemTotal or MemAvailable");
        }
        let total = mem.total.unwrap_or(0);
        let available = mem.available.unwrap_or(0);
        MemoryInfo {
            total: Bytes(total),
            available: Bytes(available),
            in_use: Bytes(total.saturating_sub(available)),
        }
    }

    /// The cached KVM facts, or a fresh attempt to read them.
    fn virtualization(&self) -> Virtualization {
        if let Some(info) = self.kvm.get() {
            return Virtualization::Available(info.clone());
        }
        match read_kvm(&self.kvm_device) {
            Ok(info) => Virtualization::Available(self.kvm.get_or_init(|| info).clone()),
            Err(reason) => {
                debug!(%reason, "KVM unavailable");
                Virtualization::Unavailable { reason }
            }
        }
    }
}

/// Reads a whole text file, logging a failure at debug level.
fn read_text(path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(err) => {
            debug!(path = %path.display(), %err, "cannot read host fact");
            None
        }
    }
}

/// Opens the KVM device and reads its facts; `Err` is the operator-facing
/// reason it is unusable.
fn read_kvm(device: &Path) -> Result<KvmInfo, String> {
    let shown = device.display();
    let c_path = CString::new(device.as_os_str().as_bytes())
        .map_err(|_| format!("{shown}: the path contains a NUL byte"))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|err| open_failure(device, &err.into()))?;
    let api_version = kvm.get_api_version();
    if api_version < 0 {
        let err = io::Error::last_os_error();
        return Err(format!(
            "{shown} is not a KVM device (KVM_GET_API_VERSION failed: {err})"
        ));
    }
    if api_version != SUPPORTED_KVM_API_VERSION {
        return Err(format!(
            "{shown}: KVM API version {api_version} is not the supported version \
             {SUPPORTED_KVM_API_VERSION}"
        ));
    }
    let capabilities = CAPABILITIES
        .iter()
        .map(|&(name, cap)| KvmCapability {
            name: name.to_owned(),
            supported: kvm.check_extension(cap),
        })
        .collect();
    Ok(KvmInfo {
        api_version,
        recommended_vcpus: u32::try_from(kvm.get_nr_vcpus()).unwrap_or(u32::MAX),
        max_vcpus: u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX),
        max_memslots: u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX),
        capabilities,
    })
}

/// Why opening the KVM device failed, in words an operator can act on.
fn open_failure(device: &Path, err: &io::Error) -> String {
    let shown = device.display();
    match err.kind() {
        io::ErrorKind::NotFound => format!(
            "{shown} does not exist: load the kvm_intel or kvm_amd module, \
             or enable virtualization in firmware"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "{shown}: permission denied (vmd needs read-write access; is it in the kvm group?)"
        ),
        _ if matches!(err.raw_os_error(), Some(ENXIO | ENODEV)) => format!(
            "{shown} has no KVM driver behind it: load the kvm_intel or kvm_amd module, \
             or enable virtualization in firmware"
        ),
        _ => format!("cannot open {shown}: {err}"),
    }
}

/// What `/proc/meminfo` says, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MemInfo {
    /// `MemTotal`.
    total: Option<u64>,
    /// `MemAvailable` (absent before Linux 3.14).
    available: Option<u64>,
}

/// Parses `/proc/meminfo`. Values in `kB` are multiplied by 1024; a line
/// that cannot be read leaves its field `None`.
fn parse_meminfo(text: &str) -> MemInfo {
    let mut mem = MemInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "MemTotal" => &mut mem.total,
            "MemAvailable" => &mut mem.available,
            _ => continue,
        };
        if slot.is_none() {
            *slot = parse_meminfo_value(value);
        }
        if mem.total.is_some() && mem.available.is_some() {
            break;
        }
    }
    mem
}

/// `16318480 kB` → bytes; a bare number is bytes already.
fn parse_meminfo_value(value: &str) -> Option<u64> {
    let mut fields = value.split_whitespace();
    let number: u64 = fields.next()?.parse().ok()?;
    let bytes = match fields.next() {
        None => number,
        Some("kB") => number.checked_mul(1024)?,
        Some(_) => return None,
    };
    fields.next().is_none().then_some(bytes)
}

/// What `/proc/cpuinfo` says about the CPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct CpuSummary {
    /// The first `vendor_id`.
    vendor: Option<String>,
    /// The first `model name`.
    model: Option<String>,
    /// `vmx` or `svm` in the first `flags` line.
    virt_flag: Option<VirtFlag>,
    /// How many `processor` entries there are.
    processors: u32,
}

/// Parses `/proc/cpuinfo`. Lines without a `:` are skipped; empty values
/// count as absent.
fn parse_cpuinfo(text: &str) -> CpuSummary {
    let mut cpu = CpuSummary::default();
    let mut seen_flags = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "processor" => cpu.processors = cpu.processors.saturating_add(1),
            "vendor_id" if cpu.vendor.is_none() && !value.is_empty() => {
                cpu.vendor = Some(value.to_owned());
            }
            "model name" if cpu.model.is_none() && !value.is_empty() => {
                cpu.model = Some(value.to_owned());
            }
            "flags" if !seen_flags => {
                seen_flags = true;
                cpu.virt_flag = value.split_whitespace().find_map(|flag| match flag {
                    "vmx" => Some(VirtFlag::Vmx),
                    "svm" => Some(VirtFlag::Svm),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    cpu
}

/// Parses `/proc/uptime` (`12345.67 54321.00`) into whole seconds since
/// boot.
fn parse_uptime(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (whole, fraction) = first.split_once('.').unwrap_or((first, ""));
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    whole.parse().ok()
}

/// The three load averages of `/proc/loadavg`, in thousandths.
fn parse_loadavg(text: &str) -> Option<[u32; 3]> {
    let mut fields = text.split_whitespace();
    let mut load = [0u32; 3];
    for slot in &mut load {
        let (whole, fraction) = fields.next()?.split_once('.')?;
        let whole: u32 = whole.parse().ok()?;
        // The kernel prints two decimals.
        let hundredths: u32 = fraction.get(..2)?.parse().ok()?;
        *slot = whole.checked_mul(1000)?.checked_add(hundredths * 10)?;
    }
    Some(load)
}

/// The kernel's clock ticks per second in `/proc/stat` (`USER_HZ`), which
/// is 100 on every architecture Linux exports to user space.
const USER_HZ: u64 = 100;

/// The summed `cpu` line of `/proc/stat`: user nice system idle iowait irq
/// softirq steal (guest time is already inside user).
fn parse_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
    let ms = |t: u64| t.saturating_mul(1000 / USER_HZ);
    if ticks.len() < 4 {
        return None;
    }
    Some(CpuTimes {
        user_ms: ms(at(0) + at(1)),
        system_ms: ms(at(2) + at(5) + at(6)),
        idle_ms: ms(at(3) + at(4)),
        steal_ms: ms(at(7)),
    })
}

/// Counts the CPUs in a kernel CPU list (`0-3,6,8-11`).
fn parse_cpu_list(text: &str) -> Option<u32> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut count: u32 = 0;
    for part in text.split(',') {
        let n = match part.split_once('-') {
            Some((first, last)) => {
                let first: u32 = first.parse().ok()?;
                let last: u32 = last.parse().ok()?;
                last.checked_sub(first)?.checked_add(1)?
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
        count = count.checked_add(n)?;
    }
    Some(count)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs;

    use super::*;

    const INTEL_CPUINFO: &str = "\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 140
model name\t: 11th Gen Intel(R) Core(TM) i7-1185G7 @ 3.00GHz
stepping\t: 1
cpu MHz\t\t: 1800.000
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc vmx smx est tm2 ssse3
vmx flags\t: vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad
bugs\t\t: spectre_v1 spectre_v2
bogomips\t: 5990.40

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: 11th Gen Intel(R) Core(TM) i7-1185G7 @ 3.00GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic vmx
vmx flags\t: vnmi preemption_timer

";

    const AMD_CPUINFO: &str = "\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 33
model name\t: AMD Ryzen 9 5950X 16-Core Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a npt lbrv svm_lock nrip_save
bogomips\t: 6800.00

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD Ryzen 9 5950X 16-Core Processor
flags\t\t: fpu svm

processor\t: 2
vendor_id\t: AuthenticAMD
model name\t: AMD Ryzen 9 5950X 16-Core Processor
flags\t\t: fpu svm
";

    /// A guest without nested virtualization: no `vmx`, though `vmx`
    /// appears inside other words and keys.
    const NO_FLAG_CPUINFO: &str = "\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel Xeon Processor (Icelake)
flags\t\t: fpu vme de pse tsc msr pae hypervisor vmx_like svmx
vmx flags\t: vnmi
";

    /// aarch64 names none of the x86 fields.
    const ARM_CPUINFO: &str = "\
processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd0c

processor\t: 1
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
";

    const MEMINFO: &str = "\
MemTotal:       16318480 kB
MemFree:         1234567 kB
MemAvailable:    8000000 kB
Buffers:          123456 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
";

    #[test]
    fn cpuinfo_intel_vmx() {
        let cpu = parse_cpuinfo(INTEL_CPUINFO);
        assert_eq!(cpu.vendor.as_deref(), Some("GenuineIntel"));
        assert_eq!(
            cpu.model.as_deref(),
            Some("11th Gen Intel(R) Core(TM) i7-1185G7 @ 3.00GHz")
        );
        assert_eq!(cpu.virt_flag, Some(VirtFlag::Vmx));
        assert_eq!(cpu.processors, 2);
    }

    #[test]
    fn cpuinfo_amd_svm() {
        let cpu = parse_cpuinfo(AMD_CPUINFO);
        assert_eq!(cpu.vendor.as_deref(), Some("AuthenticAMD"));
        assert_eq!(
            cpu.model.as_deref(),
            Some("AMD Ryzen 9 5950X 16-Core Processor")
        );
        assert_eq!(cpu.virt_flag, Some(VirtFlag::Svm));
        assert_eq!(cpu.processors, 3);
    }

    #[test]
    fn cpuinfo_without_virt_flag() {
        let cpu = parse_cpuinfo(NO_FLAG_CPUINFO);
        assert_eq!(cpu.vendor.as_deref(), Some("GenuineIntel"));
        assert_eq!(cpu.virt_flag, None);
        assert_eq!(cpu.processors, 1);
    }

    #[test]
    fn cpuinfo_arm_has_no_x86_fields() {
        let cpu = parse_cpuinfo(ARM_CPUINFO);
        assert_eq!(
            cpu,
            CpuSummary {
                vendor: None,
                model: None,
                virt_flag: None,
                processors: 2,
            }
        );
    }

    #[test]
    fn cpuinfo_malformed_and_missing_fields() {
        assert_eq!(parse_cpuinfo(""), CpuSummary::default());
        let text = "garbage without a colon\nvendor_id\t:\nmodel name:   \n\
                    flags : fpu\nflags : vmx\n: orphan value\nprocessor\n";
        let cpu = parse_cpuinfo(text);
        // Empty values are absent; only the first `flags` line counts; a
        // `processor` line without a colon is malformed and skipped.
        assert_eq!(cpu, CpuSummary::default());
    }

    #[test]
    fn meminfo_typical() {
        assert_eq!(
            parse_meminfo(MEMINFO),
            MemInfo {
                total: Some(16_318_480 * 1024),
                available: Some(8_000_000 * 1024),
            }
        );
    }

    #[test]
    fn meminfo_missing_available() {
        let mem = parse_meminfo("MemTotal: 1024 kB\nMemFree: 512 kB\n");
        assert_eq!(mem.total, Some(1024 * 1024));
        assert_eq!(mem.available, None);
        assert_eq!(parse_meminfo(""), MemInfo::default());
    }

    #[test]
    fn meminfo_malformed_lines() {
        let text = "MemTotal 1024 kB\nMemTotal: lots kB\nMemAvailable: 12 MB\n\
                    MemAvailable: 5 kB trailing\nMemTotal: 99999999999999999999 kB\n";
        assert_eq!(parse_meminfo(text), MemInfo::default());
        // The first well-formed value wins; a bare number is bytes.
        let text = "MemTotal: x\nMemTotal: 4096\nMemAvailable: 2 kB\nMemAvailable: 9 kB\n";
        assert_eq!(
            parse_meminfo(text),
            MemInfo {
                total: Some(4096),
                available: Some(2048),
            }
        );
        // Overflowing ×1024 is unknown, not wrapped.
        let text = format!("MemTotal: {} kB\n", u64::MAX / 2);
        assert_eq!(parse_meminfo(&text).total, None);
    }

    #[test]
    fn uptime_parses() {
        assert_eq!(parse_uptime("12345.67 54321.00\n"), Some(12345));
        assert_eq!(parse_uptime("0.99 0.00"), Some(0));
        assert_eq!(parse_uptime("42"), Some(42));
    }

    #[test]
    fn uptime_malformed() {
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("  \n"), None);
        assert_eq!(parse_uptime("abc 1.0"), None);
        assert_eq!(parse_uptime(".5 1.0"), None);
        assert_eq!(parse_uptime("-5.0 1.0"), None);
        assert_eq!(parse_uptime("12.3x 1.0"), None);
        assert_eq!(parse_uptime("99999999999999999999999.0"), None);
    }

    #[test]
    fn cpu_list_parses() {
        assert_eq!(parse_cpu_list("0\n"), Some(1));
        assert_eq!(parse_cpu_list("0-7\n"), Some(8));
        assert_eq!(parse_cpu_list("0-3,6,8-11"), Some(9));
    }

    #[test]
    fn cpu_list_malformed() {
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("\n"), None);
        assert_eq!(parse_cpu_list("7-3"), None);
        assert_eq!(parse_cpu_list("0-"), None);
        assert_eq!(parse_cpu_list("0,,1"), None);
        assert_eq!(parse_cpu_list("a-b"), None);
    }

    /// A fake host: `<dir>/proc` and `<dir>/sys`.
    fn fake_host(cpu_online: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        fs::create_dir_all(proc_root.join("sys/kernel")).unwrap();
        fs::write(proc_root.join("cpuinfo"), INTEL_CPUINFO).unwrap();
        fs::write(proc_root.join("meminfo"), MEMINFO).unwrap();
        fs::write(proc_root.join("uptime"), "3600.25 7000.00\n").unwrap();
        fs::write(proc_root.join("loadavg"), "1.25 0.50 0.07 2/321 4242\n").unwrap();
        fs::write(
            proc_root.join("stat"),
            "cpu  100 20 30 4000 50 6 7 8 0 0\ncpu0 50 10 15 2000 25 3 3 4 0 0\n",
        )
        .unwrap();
        fs::write(proc_root.join("sys/kernel/hostname"), "ghaf-host\n").unwrap();
        fs::write(proc_root.join("sys/kernel/osrelease"), "6.12.1\n").unwrap();
        if let Some(list) = cpu_online {
            let sys = dir.path().join("sys").join(CPU_ONLINE);
            fs::create_dir_all(sys.parent().unwrap()).unwrap();
            fs::write(sys, list).unwrap();
        }
        dir
    }

    fn unavailable_reason(info: &HostInfo) -> &str {
        match &info.virtualization {
            Virtualization::Unavailable { reason } => reason,
            Virtualization::Available(kvm) => panic!("expected Unavailable, got {kvm:?}"),
        }
    }

    #[test]
    fn fake_host_reports_every_fact() {
        let dir = fake_host(Some("0-3,8-11\n"));
        let device = dir.path().join("no-such-kvm");
        let probe = HostProbe::with_paths(Instant::now(), device, dir.path().join("proc"));
        let info = probe.probe();
        assert_eq!(info.hostname, "ghaf-host");
        assert_eq!(info.kernel, "6.12.1");
        assert_eq!(info.vmd_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.uptime_secs, 3600);
        assert!(info.vmd_uptime_secs < 60);
        assert_eq!(
            info.cpu,
            CpuInfo {
                vendor: Some("GenuineIntel".to_owned()),
                model: Some("11th Gen Intel(R) Core(TM) i7-1185G7 @ 3.00GHz".to_owned()),
                logical_cpus: 8,
                virt_flag: Some(VirtFlag::Vmx),
            }
        );
        assert_eq!(
            info.memory,
            MemoryInfo {
                total: Bytes(16_318_480 * 1024),
                available: Bytes(8_000_000 * 1024),
                in_use: Bytes(8_318_480 * 1024),
            }
        );
        assert!(unavailable_reason(&info).contains("no-such-kvm"));
        assert_eq!(info.load_milli, [1250, 500, 70]);
        assert_eq!(
            info.cpu_times,
            Some(CpuTimes {
                user_ms: 1200,
                system_ms: 430,
                idle_ms: 40_500,
                steal_ms: 80,
            })
        );
    }

    #[test]
    fn load_and_stat_malformed() {
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("1.2x 0.1 0.1"), None);
        assert_eq!(parse_stat("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_stat("cpu  1 2 x 4\n"), None);
    }

    #[test]
    fn logical_cpus_fall_back_to_processor_lines() {
        let dir = fake_host(None);
        let probe = HostProbe::with_paths(
            Instant::now(),
            dir.path().join("kvm"),
            dir.path().join("proc"),
        );
        assert_eq!(probe.probe().cpu.logical_cpus, 2);
    }

    #[test]
    fn recent_answers_share_a_probe_for_a_short_while() {
        let dir = fake_host(Some("0-3"));
        let proc_root = dir.path().join("proc");
        let probe =
            HostProbe::with_paths(Instant::now(), dir.path().join("kvm"), proc_root.clone());
        let first = probe.recent();
        fs::write(proc_root.join("sys/kernel/hostname"), "renamed\n").unwrap();
        assert_eq!(probe.recent().hostname, first.hostname, "within RECENT");
        // Age the stored probe instead of sleeping.
        if let Some((at, _)) = probe.last.lock().unwrap().as_mut() {
            *at -= RECENT;
        }
        assert_eq!(probe.recent().hostname, "renamed", "older than RECENT");
    }

    #[test]
    fn fixed_facts_are_cached_and_the_rest_is_fresh() {
        let dir = fake_host(Some("0-3"));
        let proc_root = dir.path().join("proc");
        let probe =
            HostProbe::with_paths(Instant::now(), dir.path().join("kvm"), proc_root.clone());
        let first = probe.probe();

        fs::write(proc_root.join("cpuinfo"), AMD_CPUINFO).unwrap();
        fs::write(proc_root.join("sys/kernel/osrelease"), "7.0.0\n").unwrap();
        fs::write(proc_root.join("sys/kernel/hostname"), "renamed\n").unwrap();
        fs::write(proc_root.join("uptime"), "7200.00 1.00\n").unwrap();
        fs::write(
            proc_root.join("meminfo"),
            "MemTotal: 2048 kB\nMemAvailable: 1024 kB\n",
        )
        .unwrap();
        fs::write(dir.path().join("sys").join(CPU_ONLINE), "0-1\n").unwrap();
        let second = probe.probe();

        assert_eq!(second.cpu.vendor, first.cpu.vendor);
        assert_eq!(second.cpu.virt_flag, Some(VirtFlag::Vmx));
        assert_eq!(second.kernel, "6.12.1");
        assert_eq!(second.hostname, "renamed");
        assert_eq!(second.uptime_secs, 7200);
        assert_eq!(second.cpu.logical_cpus, 2);
        assert_eq!(second.memory.total, Bytes(2048 * 1024));
        assert_eq!(second.memory.available, Bytes(1024 * 1024));
    }

    #[test]
    fn unreadable_proc_gives_unknowns() {
        let dir = tempfile::tempdir().unwrap();
        let probe = HostProbe::with_paths(
            Instant::now(),
            dir.path().join("kvm"),
            dir.path().join("proc"),
        );
        let info = probe.probe();
        assert_eq!(info.hostname, "");
        assert_eq!(info.kernel, "");
        assert_eq!(info.uptime_secs, 0);
        assert_eq!(
            info.cpu,
            CpuInfo {
                vendor: None,
                model: None,
                logical_cpus: 0,
                virt_flag: None,
            }
        );
        assert_eq!(info.memory.total, Bytes(0));
        assert_eq!(info.memory.available, Bytes(0));
        assert!(matches!(
            info.virtualization,
            Virtualization::Unavailable { .. }
        ));
    }

    #[test]
    fn missing_kvm_device_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("kvm");
        let probe = HostProbe::with_paths(Instant::now(), device.clone(), PathBuf::from("/proc"));
        let info = probe.probe();
        let reason = unavailable_reason(&info);
        assert!(reason.contains(&device.display().to_string()), "{reason}");
        assert!(reason.contains("does not exist"), "{reason}");
        assert!(reason.contains("kvm_intel"), "{reason}");
        // Not cached: still unavailable on the next probe, without a panic.
        assert!(matches!(
            probe.probe().virtualization,
            Virtualization::Unavailable { .. }
        ));
    }

    #[test]
    fn regular_file_is_not_kvm() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let probe = HostProbe::with_paths(
            Instant::now(),
            file.path().to_path_buf(),
            PathBuf::from("/proc"),
        );
        let info = probe.probe();
        let reason = unavailable_reason(&info);
        assert!(
            reason.contains(&file.path().display().to_string()),
            "{reason}"
        );
    }

    #[test]
    fn open_failures_explain_themselves() {
        let device = Path::new("/dev/kvm");
        let denied = open_failure(device, &io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(
            denied,
            "/dev/kvm: permission denied (vmd needs read-write access; is it in the kvm group?)"
        );
        let no_driver = open_failure(device, &io::Error::from_raw_os_error(ENXIO));
        assert!(no_driver.contains("kvm_amd"), "{no_driver}");
        let other = open_failure(device, &io::Error::from_raw_os_error(21));
        assert!(other.starts_with("cannot open /dev/kvm: "), "{other}");
    }

    #[test]
    fn real_host_matches_kvm() {
        let info = HostProbe::new(Instant::now()).probe();
        let Ok(kvm) = Kvm::new() else {
            assert!(matches!(
                info.virtualization,
                Virtualization::Unavailable { .. }
            ));
            return;
        };
        let Virtualization::Available(reported) = info.virtualization else {
            panic!("KVM opens but probe says {:?}", info.virtualization);
        };
        assert_eq!(reported.api_version, 12);
        assert_eq!(reported.api_version, kvm.get_api_version());
        assert_eq!(
            usize::try_from(reported.recommended_vcpus).unwrap(),
            kvm.get_nr_vcpus()
        );
        assert_eq!(
            usize::try_from(reported.max_vcpus).unwrap(),
            kvm.get_max_vcpus()
        );
        assert_eq!(
            usize::try_from(reported.max_memslots).unwrap(),
            kvm.get_nr_memslots()
        );
        assert!(reported.max_vcpus >= reported.recommended_vcpus);
        let names: Vec<&str> = reported
            .capabilities
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names.len(), CAPABILITIES.len());
        assert!(names.contains(&"irqfd"));
        for (cap, &(name, raw)) in reported.capabilities.iter().zip(CAPABILITIES) {
            assert_eq!(cap.name, name);
            assert_eq!(cap.supported, kvm.check_extension(raw), "{name}");
        }
    }
}
