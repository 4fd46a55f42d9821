//! The vmd wire protocol: every message a client and the daemon exchange,
//! and the frame format that carries them.
//!
//! Messages are serialized with [postcard] (a compact, documented, stable
//! format) inside length-prefixed frames ([`frame`]). This crate does no
//! I/O; the optional `codec` feature adds a `tokio_util` codec.
//!
//! # Layout
//!
//! - [`types`]: domain values (`VmName`, `Cid`, `Bytes`, `Role`, states).
//! - [`message`]: the session (`Hello` → `Welcome`), `Request`/`Op`,
//!   `Response`/`Reply`, the closed error enum `ErrorReply`, and the
//!   host/VM/operation records.
//! - [`frame`]: `u32` big-endian length prefix + postcard body; limits.
//! - [`json`]: the JSON spelling of the same values (lower-case
//!   `snake_case`, tagged objects), which leaves the wire bytes alone.
//! - `codec` (feature `codec`): `FrameCodec` for `tokio_util::codec`.
//! - [`dev`]: where `vmd serve --dev` and `vmctl --dev` meet.
//! - [`error_chain`]: one-line error reports for both command lines.
//!
//! # Compatibility runbook
//!
//! postcard is not self-describing: a decoder reads fields by position and
//! enum variants by index. So:
//!
//! - **Compatible** (no version bump): appending a new variant at the *end*
//!   of `Op`, `Reply`, `ErrorReply` or another enum. An older server
//!   answers an unknown `Op` with `ErrorReply::Malformed` for that request
//!   id and keeps the connection; new `Reply`/`ErrorReply` variants may
//!   only be sent in answer to requests that older clients never send.
//! - **Breaking** (bump [`PROTOCOL_VERSION`]): adding, removing, reordering
//!   or retyping a field of any struct or variant (even an `Option` at the
//!   end: an old decoder rejects the trailing bytes, a new one runs out of
//!   input); reordering or removing variants; changing the frame header or
//!   a limit downwards.
//! - Renaming a Rust item without changing its position or type is free.
//! - The golden-bytes tests at the bottom of this file pin the format; if
//!   one fails, the change is breaking unless it only appended a variant.
//!
//! The server speaks exactly one version and answers any other with
//! `ErrorReply::VersionMismatch` before closing.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "codec")]
pub mod codec;
pub mod frame;
pub mod json;
pub mod message;
pub mod types;

pub use message::{
    CpuInfo, CpuTimes, ErrorReply, Hello, HelloReply, HostInfo, KvmCapability, KvmInfo, LastExit,
    LiveFacts, LiveSource, MemoryCounts, MemoryInfo, NetInterface, Op, OperationInfo,
    OperationStatus, PendingOperation, Reply, Request, Resources, Response, Rights, RuntimeDevice,
    Share, UnitInfo, VcpuCounts, VirtFlag, Virtualization, VmInfo, WatchEvent, Welcome,
};
pub use types::{Bytes, Cid, Hypervisor, OperationId, OperationKind, Role, VmName, VmState};

/// The protocol version this crate speaks. See the compatibility runbook.
pub const PROTOCOL_VERSION: u16 = 2;

/// The default port, for TCP and vsock alike.
pub const DEFAULT_PORT: u16 = 9876;

/// The DNS name in every server certificate; clients verify it by default.
pub const SERVER_NAME: &str = "vmd";

/// Formats an error and its `source()` chain as `error: cause: cause`, the
/// one-line form both `vmd` and `vmctl` print (each message appears once,
/// since error types here do not repeat their source in their message).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// Conventions shared by `vmd serve --dev` and `vmctl --dev`, so a
/// development client finds the development daemon with no configuration.
pub mod dev {
    use std::path::PathBuf;

    /// The loopback address the development daemon listens on.
    pub const TCP_ADDR: &str = "127.0.0.1:9876";

    /// The name (and SAN) of the development client certificate.
    pub const CLIENT_NAME: &str = "dev-admin";

    /// The development state directory: `$VMD_DEV_DIR`, else
    /// `$XDG_STATE_HOME/vmd/dev`, else `$HOME/.local/state/vmd/dev`, else
    /// `./.vmd-dev`.
    pub fn dir() -> PathBuf {
        let env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = env("VMD_DEV_DIR") {
            return dir.into();
        }
        if let Some(state) = env("XDG_STATE_HOME") {
            return PathBuf::from(state).join("vmd/dev");
        }
        if let Some(home) = env("HOME") {
            return PathBuf::from(home).join(".local/state/vmd/dev");
        }
        PathBuf::from(".vmd-dev")
    }

    /// The development PKI directory (CA, server and client certificates).
    pub fn pki_dir() -> PathBuf {
        dir().join("pki")
    }

    /// The development CA certificate.
    pub fn ca_cert() -> PathBuf {
        pki_dir().join("ca.pem")
    }

    /// The development client certificate.
    pub fn client_cert() -> PathBuf {
        pki_dir().join("clients").join(format!("{CLIENT_NAME}.pem"))
    }

    /// The development client key.
    pub fn client_key() -> PathBuf {
        pki_dir().join("clients").join(format!("{CLIENT_NAME}.key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME, decode, encode};

    fn vm(name: &str) -> VmName {
        VmName::new(name).expect("test VM names are valid")
    }

    fn round_trip<T>(msg: &T, max: u32)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let bytes = encode(msg, max).expect("encodes");
        let len = frame::body_len(bytes[..4].try_into().expect("header"), max).expect("fits");
        assert_eq!(len, bytes.len() - 4);
        let back: T = decode(&bytes[4..]).expect("decodes");
        assert_eq!(&back, msg);
    }

    pub(crate) fn sample_vm() -> VmInfo {
        VmInfo {
            name: vm("gui-vm"),
            description: Some("GUI".into()),
            hypervisor: Some(Hypervisor::Qemu),
            state: VmState::Running,
            autostart: Some(true),
            protected: false,
            vsock_cid: Some(Cid(3)),
            vcpus: VcpuCounts {
                declared: Some(2),
                current: Some(2),
                max: Some(4),
            },
            memory: MemoryCounts {
                declared: Some(Bytes::mib(1024)),
                current: Some(Bytes::mib(1024)),
                balloon_actual: Some(Bytes::mib(900)),
                max: Some(Bytes::mib(2048)),
            },
            pid: Some(4242),
            uptime_secs: Some(60),
            cgroup_memory: Some(Bytes::mib(1100)),
            cpu_time_ns: Some(1_000_000),
            tasks: Some(7),
            pending: Some(PendingOperation {
                id: Some(OperationId(9)),
                kind: OperationKind::Resize,
                since_unix_ms: 1,
            }),
            unit: Some(UnitInfo {
                name: "microvm@gui-vm.service".into(),
                active_state: "active".into(),
                sub_state: "running".into(),
                freezer_state: Some("running".into()),
                age_ms: Some(12),
            }),
            run_state: Some("running".into()),
            live: LiveFacts {
                source: LiveSource::Monitor,
                age_ms: Some(3),
                note: None,
            },
            last_exit: Some(LastExit {
                result: "signal".into(),
                exit_status: None,
                signal: Some(9),
                at_unix_ms: Some(5),
            }),
            restarts: Some(1),
            restart_needed: Some(false),
            resources: Resources {
                interfaces: vec![NetInterface {
                    name: "vm-gui".into(),
                    kind: "tap".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                }],
                shares: vec![Share {
                    tag: "ro-store".into(),
                    source: "/nix/store".into(),
                }],
                pci_devices: vec!["0000:00:02.0".into()],
                usb_devices: vec![],
                runtime_devices: Some(vec![RuntimeDevice {
                    id: "balloon0".into(),
                    driver: "virtio-balloon-pci".into(),
                }]),
            },
        }
    }

    pub(crate) fn sample_host() -> HostInfo {
        HostInfo {
            hostname: "ghaf-host".into(),
            kernel: "6.1.0".into(),
            vmd_version: "0.1.0".into(),
            uptime_secs: 100,
            vmd_uptime_secs: 5,
            cpu: CpuInfo {
                vendor: Some("GenuineIntel".into()),
                model: None,
                logical_cpus: 2,
                virt_flag: Some(VirtFlag::Vmx),
            },
            memory: MemoryInfo {
                total: Bytes::mib(24 * 1024),
                available: Bytes::mib(20 * 1024),
                in_use: Bytes::mib(4 * 1024),
            },
            virtualization: Virtualization::Available(KvmInfo {
                api_version: 12,
                recommended_vcpus: 2,
                max_vcpus: 1024,
                max_memslots: 32764,
                capabilities: vec![KvmCapability {
                    name: "irqfd".into(),
                    supported: true,
                }],
            }),
            load_milli: [250, 120, 50],
            cpu_times: Some(CpuTimes {
                user_ms: 1000,
                system_ms: 500,
                idle_ms: 90_000,
                steal_ms: 3,
            }),
        }
    }

    fn all_ops() -> Vec<Op> {
        let name = vm("net-vm");
        vec![
            Op::Host,
            Op::ListVms,
            Op::GetVm { name: name.clone() },
            Op::Start { name: name.clone() },
            Op::Shutdown {
                name: name.clone(),
                force: true,
                timeout_secs: Some(30),
            },
            Op::Restart { name: name.clone() },
            Op::Pause { name: name.clone() },
            Op::Resume { name: name.clone() },
            Op::Resize {
                name,
                vcpus: Some(4),
                memory: Some(Bytes::mib(2048)),
            },
            Op::GetOperation { id: OperationId(1) },
            Op::WaitOperation {
                id: OperationId(1),
                timeout_ms: 5000,
            },
            Op::Watch {
                since: 17,
                vms: vec![VmName::new("gui-vm").expect("valid")],
                timeout_ms: 60_000,
            },
            Op::Rights,
        ]
    }

    fn all_errors() -> Vec<ErrorReply> {
        vec![
            ErrorReply::Unauthenticated,
            ErrorReply::Forbidden {
                reason: "role reader".into(),
            },
            ErrorReply::NotFound {
                what: "vm x".into(),
            },
            ErrorReply::Busy {
                vm: "x".into(),
                operation: OperationKind::Start,
                since_unix_ms: 5,
            },
            ErrorReply::Unsupported {
                reason: "later".into(),
            },
            ErrorReply::InvalidArgument {
                reason: "vcpus".into(),
            },
            ErrorReply::Timeout,
            ErrorReply::Unavailable {
                reason: "systemd".into(),
            },
            ErrorReply::Internal,
            ErrorReply::VersionMismatch {
                client: 2,
                server: 1,
            },
            ErrorReply::Malformed {
                reason: "garbage".into(),
            },
            ErrorReply::Failed {
                reason: "job failed".into(),
            },
            ErrorReply::LimitExceeded {
                limit: "rate".into(),
                retry_after_ms: Some(100),
            },
        ]
    }

    #[test]
    fn every_request_round_trips() {
        round_trip(
            &Hello {
                protocol: PROTOCOL_VERSION,
                client_name: "vmctl".into(),
            },
            MAX_REQUEST_FRAME,
        );
        for (id, body) in (0..).zip(all_ops()) {
            round_trip(&Request { id, body }, MAX_REQUEST_FRAME);
        }
    }

    #[test]
    fn every_reply_round_trips() {
        let welcome: HelloReply = Ok(Welcome {
            protocol: PROTOCOL_VERSION,
            server_version: "0.1.0".into(),
            identity: "gui-vm".into(),
            role: Some(Role::Operator),
        });
        round_trip(&welcome, MAX_REPLY_FRAME);
        let op = OperationInfo {
            id: OperationId(3),
            vm: vm("gui-vm"),
            kind: OperationKind::Shutdown,
            status: OperationStatus::Failed(ErrorReply::Timeout),
            started_unix_ms: 10,
            finished_unix_ms: Some(20),
        };
        let replies = vec![
            Reply::Host(sample_host()),
            Reply::Vms(vec![sample_vm(), sample_vm()]),
            Reply::Vm(sample_vm()),
            Reply::Accepted(OperationInfo {
                status: OperationStatus::Running,
                finished_unix_ms: None,
                ..op.clone()
            }),
            Reply::Operation(op),
            Reply::Changed(WatchEvent {
                generation: 18,
                snapshot: false,
                changed: vec![sample_vm()],
                removed: vec![vm("net-vm")],
            }),
        ];
        for (id, reply) in (0..).zip(replies) {
            round_trip(
                &Response {
                    id,
                    result: Ok(reply),
                },
                MAX_REPLY_FRAME,
            );
        }
        for (id, err) in (0..).zip(all_errors()) {
            round_trip(&HelloReply::Err(err.clone()), MAX_REPLY_FRAME);
            round_trip(
                &Response {
                    id,
                    result: Err(err),
                },
                MAX_REPLY_FRAME,
            );
        }
    }

    #[test]
    fn host_info_with_kvm_unavailable_round_trips() {
        let mut host = sample_host();
        host.virtualization = Virtualization::Unavailable {
            reason: "/dev/kvm: no such file".into(),
        };
        round_trip(
            &Response {
                id: 1,
                result: Ok(Reply::Host(host)),
            },
            MAX_REPLY_FRAME,
        );
    }

    // Golden bytes: these pin the wire format. If one fails, read the
    // compatibility runbook above before changing the expected bytes.

    #[test]
    fn golden_hello() {
        let hello = Hello {
            protocol: 1,
            client_name: "vmctl".into(),
        };
        assert_eq!(
            encode(&hello, MAX_REQUEST_FRAME).expect("encodes"),
            [0, 0, 0, 7, 1, 5, b'v', b'm', b'c', b't', b'l']
        );
    }

    #[test]
    fn golden_get_vm_request() {
        let req = Request {
            id: 300,
            body: Op::GetVm { name: vm("gui-vm") },
        };
        // id 300 = varint ac 02; GetVm = variant 2; name = len 6 + bytes.
        assert_eq!(
            encode(&req, MAX_REQUEST_FRAME).expect("encodes"),
            [
                0, 0, 0, 10, 0xac, 0x02, 2, 6, b'g', b'u', b'i', b'-', b'v', b'm'
            ]
        );
    }

    #[test]
    fn golden_busy_response() {
        let resp = Response {
            id: 1,
            result: Err(ErrorReply::Busy {
                vm: "a".into(),
                operation: OperationKind::Restart,
                since_unix_ms: 1000,
            }),
        };
        // id 1; Err = 1; Busy = variant 3; "a"; Restart = 2; 1000 = e8 07.
        assert_eq!(
            encode(&resp, MAX_REPLY_FRAME).expect("encodes"),
            [0, 0, 0, 8, 1, 1, 3, 1, b'a', 2, 0xe8, 0x07]
        );
    }

    #[test]
    fn golden_welcome() {
        let welcome: HelloReply = Ok(Welcome {
            protocol: 1,
            server_version: "0.1".into(),
            identity: "x".into(),
            role: Some(Role::Admin),
        });
        // Ok = 0; protocol 1; "0.1"; "x"; Some = 1; Admin = 2.
        assert_eq!(
            encode(&welcome, MAX_REPLY_FRAME).expect("encodes"),
            [0, 0, 0, 10, 0, 1, 3, b'0', b'.', b'1', 1, b'x', 1, 2]
        );
    }

    #[test]
    fn golden_rights() {
        // Appended variants: Rights is Op 12 and Reply 6, so the bytes of
        // every earlier variant stay as they were.
        let req = Request {
            id: 1,
            body: Op::Rights,
        };
        assert_eq!(
            encode(&req, MAX_REQUEST_FRAME).expect("encodes"),
            [0, 0, 0, 2, 1, 12]
        );
        let resp = Response {
            id: 1,
            result: Ok(Reply::Rights(Rights {
                identity: "x".into(),
                role: Some(Role::Operator),
                changeable: vec![vm("a")],
            })),
        };
        // id 1; Ok = 0; Rights = 6; "x"; Some = 1; Operator = 1; [ "a" ].
        assert_eq!(
            encode(&resp, MAX_REPLY_FRAME).expect("encodes"),
            [0, 0, 0, 10, 1, 0, 6, 1, b'x', 1, 1, 1, 1, b'a']
        );
    }

    #[test]
    fn unknown_op_variant_keeps_its_id_readable() {
        // A newer client's op (variant 200) must not hide the request id.
        let body = [0x05, 0xc8, 0x01];
        assert!(decode::<Request>(&body).is_err());
        assert_eq!(frame::peek_request_id(&body), Some(5));
    }

    #[test]
    fn invalid_vm_name_is_rejected_on_decode() {
        // GetVm with name "../x".
        let body = [1, 2, 4, b'.', b'.', b'/', b'x'];
        assert!(decode::<Request>(&body).is_err());
    }
}
