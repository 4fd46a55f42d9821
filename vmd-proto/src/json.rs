//! The JSON spelling of the protocol's values, for `vmctl --json` and
//! any other client that prints them.
//!
//! One type, two encodings: postcard (the wire) writes enum variants by
//! index and never a name, serde_json writes names. serde tells them
//! apart with [`serde::Serializer::is_human_readable`]: postcard is not
//! human readable, serde_json is. So:
//!
//! 1. Enums without data (`VmState`, `OperationKind`, `Role`, `VirtFlag`,
//!    `LiveSource`) are renamed `snake_case`: JSON says `"running"`, the
//!    wire bytes are the same as before (postcard never sees a name).
//! 2. Enums with data (`Virtualization`, `ErrorReply`), and
//!    `OperationInfo` whose status carries an error, keep their derived
//!    wire encoding as inherent functions (`#[serde(remote = "Self")]`);
//!    their `Serialize`/`Deserialize` impls here pick the wire encoding
//!    for postcard and a JSON shape, declared below as a serde "remote"
//!    mirror, for human-readable formats. The mirrors list the same
//!    fields as the types, so the compiler keeps them in step.
//! 3. `Hypervisor` is a plain string in JSON ([`Hypervisor::json_name`]).
//!
//! The JSON shapes (every value lower-case `snake_case`):
//!
//! | Value | JSON |
//! |---|---|
//! | `VmState` | `"running"`, `"paused"`, `"frozen"`, `"stopped"`, `"starting"`, `"stopping"`, `"restarting"`, `"failed"`, `"unknown"` |
//! | `Hypervisor` | `"qemu"`, `"cloud_hypervisor"`, `"crosvm"`, `"firecracker"`, or the declared name |
//! | `OperationKind` | `"start"`, `"shutdown"`, `"restart"`, `"pause"`, `"resume"`, `"resize"` |
//! | `Role` | `"reader"`, `"operator"`, `"admin"`, `"metrics"` |
//! | `VirtFlag` | `"vmx"`, `"svm"` |
//! | `LiveSource` | `"none"`, `"monitor"`, `"shared_socket"` |
//! | `Virtualization` | `{"status": "available", "api_version": 12, …}`, `{"status": "unavailable", "reason": "…"}` |
//! | `OperationInfo` | `{"id": 7, "vm": "…", "kind": "start", "status": "running" \| "succeeded" \| "failed", "error": {…} (only when failed), "started_unix_ms": …, "finished_unix_ms": …}` |
//! | `ErrorReply` | `{"kind": "busy", "vm": "…", "operation": "start", "since_unix_ms": …}`, `{"kind": "timeout"}`, … (`kind` is the variant in `snake_case`) |
//!
//! Reading JSON back accepts the same shapes.

use serde::de::Error as _;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::message::{ErrorReply, KvmInfo, OperationInfo, OperationStatus, Virtualization};
use crate::types::{Hypervisor, OperationId, OperationKind, VmName};

/// Implements `Serialize` and `Deserialize` for `$ty`: its derived wire
/// functions for postcard, the remote mirror `$json` for JSON.
macro_rules! wire_or_json {
    ($ty:ty, $json:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    <$json>::serialize(self, serializer)
                } else {
                    <$ty>::serialize(self, serializer)
                }
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    <$json>::deserialize(deserializer)
                } else {
                    <$ty>::deserialize(deserializer)
                }
            }
        }
    };
}

wire_or_json!(Virtualization, VirtualizationJson);
wire_or_json!(ErrorReply, ErrorReplyJson);
wire_or_json!(OperationInfo, OperationInfoJson);

/// `Virtualization` in JSON: tagged by `status`.
#[derive(Serialize, Deserialize)]
#[serde(remote = "Virtualization", tag = "status", rename_all = "snake_case")]
enum VirtualizationJson {
    Available(KvmInfo),
    Unavailable { reason: String },
}

/// `ErrorReply` in JSON: tagged by `kind`.
#[derive(Serialize, Deserialize)]
#[serde(remote = "ErrorReply", tag = "kind", rename_all = "snake_case")]
enum ErrorReplyJson {
    Unauthenticated,
    Forbidden {
        reason: String,
    },
    NotFound {
        what: String,
    },
    Busy {
        vm: String,
        operation: OperationKind,
        since_unix_ms: u64,
    },
    Unsupported {
        reason: String,
    },
    InvalidArgument {
        reason: String,
    },
    Timeout,
    Unavailable {
        reason: String,
    },
    Internal,
    VersionMismatch {
        client: u16,
        server: u16,
    },
    Malformed {
        reason: String,
    },
    Failed {
        reason: String,
    },
    LimitExceeded {
        limit: String,
        retry_after_ms: Option<u64>,
    },
}

/// `OperationInfo` in JSON: the status's fields (`status`, `error`)
/// inline.
#[derive(Serialize, Deserialize)]
#[serde(remote = "OperationInfo")]
struct OperationInfoJson {
    id: OperationId,
    vm: VmName,
    kind: OperationKind,
    #[serde(flatten)]
    status: OperationStatus,
    started_unix_ms: u64,
    finished_unix_ms: Option<u64>,
}

/// An operation's status word in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StatusName {
    Running,
    Succeeded,
    Failed,
}

/// `OperationStatus` read from JSON.
#[derive(Deserialize)]
struct StatusJson {
    status: StatusName,
    #[serde(default)]
    error: Option<ErrorReply>,
}

impl Serialize for OperationStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !serializer.is_human_readable() {
            return Self::serialize(self, serializer);
        }
        let (name, error) = match self {
            Self::Running => (StatusName::Running, None),
            Self::Succeeded => (StatusName::Succeeded, None),
            Self::Failed(error) => (StatusName::Failed, Some(error)),
        };
        let mut out =
            serializer.serialize_struct("OperationStatus", 1 + usize::from(error.is_some()))?;
        out.serialize_field("status", &name)?;
        if let Some(error) = error {
            out.serialize_field("error", error)?;
        }
        out.end()
    }
}

impl<'de> Deserialize<'de> for OperationStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if !deserializer.is_human_readable() {
            return Self::deserialize(deserializer);
        }
        let json = StatusJson::deserialize(deserializer)?;
        match (json.status, json.error) {
            (StatusName::Running, None) => Ok(Self::Running),
            (StatusName::Succeeded, None) => Ok(Self::Succeeded),
            (StatusName::Failed, Some(error)) => Ok(Self::Failed(error)),
            (StatusName::Failed, None) => {
                Err(D::Error::custom("a failed operation needs its `error`"))
            }
            (StatusName::Running | StatusName::Succeeded, Some(_)) => {
                Err(D::Error::custom("only a failed operation has an `error`"))
            }
        }
    }
}

impl Serialize for Hypervisor {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(self.json_name())
        } else {
            Self::serialize(self, serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Hypervisor {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let name = String::deserialize(deserializer)?;
            if name.is_empty() {
                return Err(D::Error::custom("a hypervisor name is not empty"));
            }
            Ok(Self::from_name(&name))
        } else {
            Self::deserialize(deserializer)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::message::{LiveSource, VirtFlag};
    use crate::tests::{sample_host, sample_vm};
    use crate::types::Role;

    /// `value` as JSON, and back to the same value.
    fn spelled<T>(value: &T) -> Value
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let json = serde_json::to_value(value).expect("serializes");
        let back: T = serde_json::from_value(json.clone()).expect("reads back");
        assert_eq!(&back, value, "{json}");
        json
    }

    #[test]
    fn vm_states_are_lower_case() {
        use crate::types::VmState::*;
        for (state, name) in [
            (Running, "running"),
            (Paused, "paused"),
            (Stopped, "stopped"),
            (Starting, "starting"),
            (Stopping, "stopping"),
            (Failed, "failed"),
            (Unknown, "unknown"),
            (Frozen, "frozen"),
            (Restarting, "restarting"),
        ] {
            assert_eq!(spelled(&state), name);
            // The table's word and the JSON word are the same.
            assert_eq!(state.to_string(), name);
        }
    }

    #[test]
    fn operation_kinds_roles_flags_and_sources_are_snake_case() {
        use crate::types::OperationKind::*;
        for (kind, name) in [
            (Start, "start"),
            (Shutdown, "shutdown"),
            (Restart, "restart"),
            (Pause, "pause"),
            (Resume, "resume"),
            (Resize, "resize"),
        ] {
            assert_eq!(spelled(&kind), name);
        }
        for (role, name) in [
            (Role::Reader, "reader"),
            (Role::Operator, "operator"),
            (Role::Admin, "admin"),
            (Role::Metrics, "metrics"),
        ] {
            assert_eq!(spelled(&role), name);
        }
        assert_eq!(spelled(&VirtFlag::Vmx), "vmx");
        assert_eq!(spelled(&VirtFlag::Svm), "svm");
        assert_eq!(spelled(&LiveSource::None), "none");
        assert_eq!(spelled(&LiveSource::Monitor), "monitor");
        assert_eq!(spelled(&LiveSource::SharedSocket), "shared_socket");
    }

    #[test]
    fn hypervisors_are_strings() {
        for (hv, name) in [
            (Hypervisor::Qemu, "qemu"),
            (Hypervisor::CloudHypervisor, "cloud_hypervisor"),
            (Hypervisor::Crosvm, "crosvm"),
            (Hypervisor::Firecracker, "firecracker"),
            (Hypervisor::Other("stratovirt".into()), "stratovirt"),
        ] {
            assert_eq!(spelled(&hv), name);
        }
        // microvm.nix's spelling reads as the same hypervisor.
        let hv: Hypervisor = serde_json::from_value(json!("cloud-hypervisor")).expect("reads");
        assert_eq!(hv, Hypervisor::CloudHypervisor);
        let err = serde_json::from_value::<Hypervisor>(json!("")).expect_err("empty");
        assert!(err.to_string().contains("not empty"), "{err}");
    }

    #[test]
    fn virtualization_is_tagged_by_status() {
        let host = sample_host();
        let json = spelled(&host.virtualization);
        assert_eq!(json["status"], "available");
        assert_eq!(json["api_version"], 12);
        assert_eq!(json["capabilities"][0]["name"], "irqfd");
        let off = Virtualization::Unavailable {
            reason: "no /dev/kvm".into(),
        };
        assert_eq!(
            spelled(&off),
            json!({"status": "unavailable", "reason": "no /dev/kvm"})
        );
        let host_json = spelled(&host);
        assert_eq!(host_json["cpu"]["virt_flag"], "vmx");
        assert_eq!(host_json["virtualization"]["status"], "available");
    }

    #[test]
    fn every_error_is_tagged_by_kind() {
        let cases = [
            (
                ErrorReply::Unauthenticated,
                json!({"kind": "unauthenticated"}),
            ),
            (
                ErrorReply::Forbidden { reason: "r".into() },
                json!({"kind": "forbidden", "reason": "r"}),
            ),
            (
                ErrorReply::NotFound {
                    what: "VM x".into(),
                },
                json!({"kind": "not_found", "what": "VM x"}),
            ),
            (
                ErrorReply::Busy {
                    vm: "gui-vm".into(),
                    operation: OperationKind::Start,
                    since_unix_ms: 5,
                },
                json!({"kind": "busy", "vm": "gui-vm", "operation": "start", "since_unix_ms": 5}),
            ),
            (
                ErrorReply::Unsupported { reason: "r".into() },
                json!({"kind": "unsupported", "reason": "r"}),
            ),
            (
                ErrorReply::InvalidArgument { reason: "r".into() },
                json!({"kind": "invalid_argument", "reason": "r"}),
            ),
            (ErrorReply::Timeout, json!({"kind": "timeout"})),
            (
                ErrorReply::Unavailable { reason: "r".into() },
                json!({"kind": "unavailable", "reason": "r"}),
            ),
            (ErrorReply::Internal, json!({"kind": "internal"})),
            (
                ErrorReply::VersionMismatch {
                    client: 1,
                    server: 2,
                },
                json!({"kind": "version_mismatch", "client": 1, "server": 2}),
            ),
            (
                ErrorReply::Malformed { reason: "r".into() },
                json!({"kind": "malformed", "reason": "r"}),
            ),
            (
                ErrorReply::Failed { reason: "r".into() },
                json!({"kind": "failed", "reason": "r"}),
            ),
            (
                ErrorReply::LimitExceeded {
                    limit: "rate".into(),
                    retry_after_ms: Some(10),
                },
                json!({"kind": "limit_exceeded", "limit": "rate", "retry_after_ms": 10}),
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(spelled(&error), expected);
        }
    }

    #[test]
    fn operations_say_their_status_in_a_word() {
        let mut op = OperationInfo {
            id: OperationId(7),
            vm: VmName::new("gui-vm").expect("valid"),
            kind: OperationKind::Restart,
            status: OperationStatus::Running,
            started_unix_ms: 1,
            finished_unix_ms: None,
        };
        assert_eq!(
            spelled(&op),
            json!({"id": 7, "vm": "gui-vm", "kind": "restart", "status": "running",
                   "started_unix_ms": 1, "finished_unix_ms": null})
        );
        op.status = OperationStatus::Succeeded;
        assert_eq!(spelled(&op)["status"], "succeeded");
        op.status = OperationStatus::Failed(ErrorReply::Timeout);
        let json = spelled(&op);
        assert_eq!(json["status"], "failed");
        assert_eq!(json["error"], json!({"kind": "timeout"}));
        assert_eq!(
            spelled(&OperationStatus::Running),
            json!({"status": "running"})
        );

        let err = serde_json::from_value::<OperationInfo>(json!({
            "id": 7, "vm": "gui-vm", "kind": "restart", "status": "failed",
            "started_unix_ms": 1, "finished_unix_ms": null
        }))
        .expect_err("failed without an error");
        assert!(err.to_string().contains("needs its `error`"), "{err}");
    }

    #[test]
    fn a_vm_reads_as_snake_case_and_back() {
        let json = spelled(&sample_vm());
        assert_eq!(json["state"], "running");
        assert_eq!(json["hypervisor"], "qemu");
        assert_eq!(json["pending"]["kind"], "resize");
        assert_eq!(json["live"]["source"], "monitor");
    }

    #[test]
    fn postcard_still_writes_variant_indexes() {
        // The renames and JSON shapes do not reach the wire: a
        // data-carrying enum is still its index then its fields.
        let bytes = postcard::to_stdvec(&Virtualization::Unavailable { reason: "x".into() })
            .expect("encodes");
        assert_eq!(bytes, [1, 1, b'x']);
        let bytes = postcard::to_stdvec(&Hypervisor::Other("x".into())).expect("encodes");
        assert_eq!(bytes, [4, 1, b'x']);
        let bytes =
            postcard::to_stdvec(&OperationStatus::Failed(ErrorReply::Timeout)).expect("encodes");
        assert_eq!(bytes, [2, 6]);
    }
}
