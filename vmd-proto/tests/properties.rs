//! Property tests of the wire format.
//!
//! 1. Strategies below build every message type: `Request` with every
//!    `Op`, `Response` with every `Reply` and every `ErrorReply`, `Hello`
//!    and `HelloReply`. `strategies_cover_every_variant` (and the
//!    exhaustive matches it uses) fails to compile or to pass when a
//!    variant is added without a strategy.
//! 2. Frames: encode → header → decode gives the message back; the header
//!    check never accepts a length over its limit; arbitrary and mutated
//!    bodies never panic the decoder, and what decodes re-encodes to an
//!    equal message; a truncated body never decodes.
//! 3. The `FrameCodec` (feature `codec`; CI runs `--all-features`), fed a
//!    byte stream cut at arbitrary points, yields exactly what it yields
//!    for the stream in one piece, and never holds more than one frame.
//!
//! The counterpart for the server's request handling is the `dispatch`
//! target under `fuzz/`.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use vmd_proto::frame::{self, FrameError, HEADER_LEN, MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
use vmd_proto::{
    Bytes, Cid, CpuInfo, ErrorReply, Hello, HelloReply, HostInfo, Hypervisor, KvmCapability,
    KvmInfo, MemoryCounts, MemoryInfo, Op, OperationId, OperationInfo, OperationKind,
    OperationStatus, PendingOperation, Reply, Request, Response, Rights, Role, VcpuCounts,
    VirtFlag, Virtualization, VmInfo, VmName, VmState, WatchEvent, Welcome,
};
use vmd_proto::{
    CpuTimes, LastExit, LiveFacts, LiveSource, NetInterface, Resources, RuntimeDevice, Share,
    UnitInfo,
};

// ---- Strategies ------------------------------------------------------------

/// Any string of up to 24 characters (any Unicode scalar, controls too).
fn text() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..24).prop_map(String::from_iter)
}

/// A valid VM name (1 to 64 bytes, no leading `-` or `.`).
fn vm_name() -> impl Strategy<Value = VmName> {
    "[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
        .prop_map(|name| VmName::new(name).expect("the regex only yields valid VM names"))
}

fn bytes() -> impl Strategy<Value = Bytes> {
    any::<u64>().prop_map(Bytes)
}

fn operation_id() -> impl Strategy<Value = OperationId> {
    any::<u64>().prop_map(OperationId)
}

fn operation_kind() -> impl Strategy<Value = OperationKind> {
    prop_oneof![
        Just(OperationKind::Start),
        Just(OperationKind::Shutdown),
        Just(OperationKind::Restart),
        Just(OperationKind::Pause),
        Just(OperationKind::Resume),
        Just(OperationKind::Resize),
    ]
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Reader),
        Just(Role::Operator),
        Just(Role::Admin),
        Just(Role::Metrics)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Host),
        Just(Op::ListVms),
        vm_name().prop_map(|name| Op::GetVm { name }),
        vm_name().prop_map(|name| Op::Start { name }),
        (vm_name(), any::<bool>(), any::<Option<u32>>()).prop_map(|(name, force, timeout_secs)| {
            Op::Shutdown {
                name,
                force,
                timeout_secs,
            }
        }),
        vm_name().prop_map(|name| Op::Restart { name }),
        vm_name().prop_map(|name| Op::Pause { name }),
        vm_name().prop_map(|name| Op::Resume { name }),
        (
            vm_name(),
            any::<Option<u32>>(),
            proptest::option::of(bytes())
        )
            .prop_map(|(name, vcpus, memory)| Op::Resize {
                name,
                vcpus,
                memory,
            }),
        operation_id().prop_map(|id| Op::GetOperation { id }),
        (operation_id(), any::<u32>())
            .prop_map(|(id, timeout_ms)| Op::WaitOperation { id, timeout_ms }),
        (any::<u64>(), vec(vm_name(), 0..4), any::<u32>()).prop_map(|(since, vms, timeout_ms)| {
            Op::Watch {
                since,
                vms,
                timeout_ms,
            }
        }),
        Just(Op::Rights),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (any::<u32>(), op()).prop_map(|(id, body)| Request { id, body })
}

fn error_reply() -> impl Strategy<Value = ErrorReply> {
    prop_oneof![
        Just(ErrorReply::Unauthenticated),
        text().prop_map(|reason| ErrorReply::Forbidden { reason }),
        text().prop_map(|what| ErrorReply::NotFound { what }),
        (text(), operation_kind(), any::<u64>()).prop_map(|(vm, operation, since_unix_ms)| {
            ErrorReply::Busy {
                vm,
                operation,
                since_unix_ms,
            }
        }),
        text().prop_map(|reason| ErrorReply::Unsupported { reason }),
        text().prop_map(|reason| ErrorReply::InvalidArgument { reason }),
        Just(ErrorReply::Timeout),
        text().prop_map(|reason| ErrorReply::Unavailable { reason }),
        Just(ErrorReply::Internal),
        (any::<u16>(), any::<u16>())
            .prop_map(|(client, server)| ErrorReply::VersionMismatch { client, server }),
        text().prop_map(|reason| ErrorReply::Malformed { reason }),
        text().prop_map(|reason| ErrorReply::Failed { reason }),
        (text(), any::<Option<u64>>()).prop_map(|(limit, retry_after_ms)| {
            ErrorReply::LimitExceeded {
                limit,
                retry_after_ms,
            }
        }),
    ]
}

fn hypervisor() -> impl Strategy<Value = Hypervisor> {
    prop_oneof![
        Just(Hypervisor::Qemu),
        Just(Hypervisor::CloudHypervisor),
        Just(Hypervisor::Crosvm),
        Just(Hypervisor::Firecracker),
        text().prop_map(Hypervisor::Other),
    ]
}

fn vm_state() -> impl Strategy<Value = VmState> {
    prop_oneof![
        Just(VmState::Running),
        Just(VmState::Paused),
        Just(VmState::Stopped),
        Just(VmState::Starting),
        Just(VmState::Stopping),
        Just(VmState::Failed),
        Just(VmState::Unknown),
        Just(VmState::Frozen),
        Just(VmState::Restarting),
    ]
}

/// The lifecycle, freshness and resource facts of a VM.
fn vm_extras() -> BoxedStrategy<VmExtras> {
    let unit = proptest::option::of(
        (
            text(),
            text(),
            text(),
            proptest::option::of(text()),
            any::<Option<u64>>(),
        )
            .prop_map(
                |(name, active_state, sub_state, freezer_state, age_ms)| UnitInfo {
                    name,
                    active_state,
                    sub_state,
                    freezer_state,
                    age_ms,
                },
            )
            .boxed(),
    );
    let live = (
        prop_oneof![
            Just(LiveSource::None),
            Just(LiveSource::Monitor),
            Just(LiveSource::SharedSocket)
        ],
        any::<Option<u64>>(),
        proptest::option::of(text()),
    )
        .prop_map(|(source, age_ms, note)| LiveFacts {
            source,
            age_ms,
            note,
        });
    let last_exit = proptest::option::of(
        (
            text(),
            any::<Option<i32>>(),
            any::<Option<i32>>(),
            any::<Option<u64>>(),
        )
            .prop_map(|(result, exit_status, signal, at_unix_ms)| LastExit {
                result,
                exit_status,
                signal,
                at_unix_ms,
            }),
    );
    let resources = (
        vec(
            (text(), text(), proptest::option::of(text()))
                .prop_map(|(name, kind, mac)| NetInterface { name, kind, mac }),
            0..3,
        ),
        vec(
            (text(), text()).prop_map(|(tag, source)| Share { tag, source }),
            0..3,
        ),
        vec(text(), 0..3),
        vec(text(), 0..3),
        proptest::option::of(vec(
            (text(), text()).prop_map(|(id, driver)| RuntimeDevice { id, driver }),
            0..3,
        )),
    )
        .prop_map(
            |(interfaces, shares, pci_devices, usb_devices, runtime_devices)| Resources {
                interfaces,
                shares,
                pci_devices,
                usb_devices,
                runtime_devices,
            },
        )
        .boxed();
    (
        unit,
        proptest::option::of(text()),
        live,
        last_exit,
        any::<Option<u32>>(),
        any::<Option<bool>>(),
        resources,
    )
        .boxed()
}

type VmExtras = (
    Option<UnitInfo>,
    Option<String>,
    LiveFacts,
    Option<LastExit>,
    Option<u32>,
    Option<bool>,
    Resources,
);

fn pending_operation() -> impl Strategy<Value = PendingOperation> {
    (
        proptest::option::of(operation_id()),
        operation_kind(),
        any::<u64>(),
    )
        .prop_map(|(id, kind, since_unix_ms)| PendingOperation {
            id,
            kind,
            since_unix_ms,
        })
}

fn vm_info() -> BoxedStrategy<VmInfo> {
    let declared = (
        vm_name(),
        proptest::option::of(text()),
        proptest::option::of(hypervisor()),
        vm_state(),
        any::<Option<bool>>(),
        any::<bool>(),
        any::<Option<u32>>().prop_map(|cid| cid.map(Cid)),
    );
    let counts = (
        any::<[Option<u32>; 3]>().prop_map(|[declared, current, max]| VcpuCounts {
            declared,
            current,
            max,
        }),
        [
            proptest::option::of(bytes()),
            proptest::option::of(bytes()),
            proptest::option::of(bytes()),
            proptest::option::of(bytes()),
        ]
        .prop_map(|[declared, current, balloon_actual, max]| MemoryCounts {
            declared,
            current,
            balloon_actual,
            max,
        }),
    );
    let live = (
        any::<Option<u32>>(),
        any::<Option<u64>>(),
        proptest::option::of(bytes()),
        any::<[Option<u64>; 2]>(),
        proptest::option::of(pending_operation()),
    );
    (declared, counts, live, vm_extras())
        .prop_map(
            |(
                (name, description, hypervisor, state, autostart, protected, vsock_cid),
                (vcpus, memory),
                (pid, uptime_secs, cgroup_memory, [cpu_time_ns, tasks], pending),
                (unit, run_state, live, last_exit, restarts, restart_needed, resources),
            )| VmInfo {
                name,
                description,
                hypervisor,
                state,
                autostart,
                protected,
                vsock_cid,
                vcpus,
                memory,
                pid,
                uptime_secs,
                cgroup_memory,
                cpu_time_ns,
                tasks,
                pending,
                unit,
                run_state,
                live,
                last_exit,
                restarts,
                restart_needed,
                resources,
            },
        )
        .boxed()
}

fn host_info() -> impl Strategy<Value = HostInfo> {
    let cpu = (
        proptest::option::of(text()),
        proptest::option::of(text()),
        any::<u32>(),
        proptest::option::of(prop_oneof![Just(VirtFlag::Vmx), Just(VirtFlag::Svm)]),
    )
        .prop_map(|(vendor, model, logical_cpus, virt_flag)| CpuInfo {
            vendor,
            model,
            logical_cpus,
            virt_flag,
        });
    let kvm = (
        any::<i32>(),
        any::<[u32; 3]>(),
        vec(
            (text(), any::<bool>()).prop_map(|(name, supported)| KvmCapability { name, supported }),
            0..4,
        ),
    )
        .prop_map(
            |(api_version, [recommended_vcpus, max_vcpus, max_memslots], capabilities)| KvmInfo {
                api_version,
                recommended_vcpus,
                max_vcpus,
                max_memslots,
                capabilities,
            },
        );
    let virtualization = prop_oneof![
        kvm.prop_map(Virtualization::Available),
        text().prop_map(|reason| Virtualization::Unavailable { reason }),
    ];
    (
        [text(), text(), text()],
        any::<[u64; 2]>(),
        cpu,
        (bytes(), bytes(), bytes()).prop_map(|(total, available, in_use)| MemoryInfo {
            total,
            available,
            in_use,
        }),
        virtualization,
        any::<[u32; 3]>(),
        proptest::option::of(any::<[u64; 4]>().prop_map(
            |[user_ms, system_ms, idle_ms, steal_ms]| CpuTimes {
                user_ms,
                system_ms,
                idle_ms,
                steal_ms,
            },
        )),
    )
        .prop_map(
            |(
                [hostname, kernel, vmd_version],
                [uptime_secs, vmd_uptime_secs],
                cpu,
                memory,
                virtualization,
                load_milli,
                cpu_times,
            )| {
                HostInfo {
                    load_milli,
                    cpu_times,
                    hostname,
                    kernel,
                    vmd_version,
                    uptime_secs,
                    vmd_uptime_secs,
                    cpu,
                    memory,
                    virtualization,
                }
            },
        )
}

fn operation_info() -> impl Strategy<Value = OperationInfo> {
    let status = prop_oneof![
        Just(OperationStatus::Running),
        Just(OperationStatus::Succeeded),
        error_reply().prop_map(OperationStatus::Failed),
    ];
    (
        operation_id(),
        vm_name(),
        operation_kind(),
        status,
        any::<u64>(),
        any::<Option<u64>>(),
    )
        .prop_map(
            |(id, vm, kind, status, started_unix_ms, finished_unix_ms)| OperationInfo {
                id,
                vm,
                kind,
                status,
                started_unix_ms,
                finished_unix_ms,
            },
        )
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        host_info().prop_map(Reply::Host),
        vec(vm_info(), 0..4).prop_map(Reply::Vms),
        vm_info().prop_map(Reply::Vm),
        operation_info().prop_map(Reply::Accepted),
        operation_info().prop_map(Reply::Operation),
        (
            any::<u64>(),
            any::<bool>(),
            vec(vm_info(), 0..3),
            vec(vm_name(), 0..3)
        )
            .prop_map(|(generation, snapshot, changed, removed)| Reply::Changed(
                WatchEvent {
                    generation,
                    snapshot,
                    changed,
                    removed,
                }
            )),
        (text(), proptest::option::of(role()), vec(vm_name(), 0..4)).prop_map(
            |(identity, role, changeable)| Reply::Rights(Rights {
                identity,
                role,
                changeable,
            })
        ),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    (
        any::<u32>(),
        prop_oneof![reply().prop_map(Ok), error_reply().prop_map(Err)],
    )
        .prop_map(|(id, result)| Response { id, result })
}

fn hello() -> impl Strategy<Value = Hello> {
    (any::<u16>(), text()).prop_map(|(protocol, client_name)| Hello {
        protocol,
        client_name,
    })
}

fn hello_reply() -> impl Strategy<Value = HelloReply> {
    let welcome = (any::<u16>(), text(), text(), proptest::option::of(role())).prop_map(
        |(protocol, server_version, identity, role)| Welcome {
            protocol,
            server_version,
            identity,
            role,
        },
    );
    prop_oneof![welcome.prop_map(Ok), error_reply().prop_map(Err)]
}

// ---- Variant coverage ------------------------------------------------------
// Exhaustive matches: a new variant does not compile until it is listed
// here, and `strategies_cover_every_variant` then fails until the strategy
// above generates it.

const OPS: usize = 13;

fn op_index(op: &Op) -> usize {
    match op {
        Op::Host => 0,
        Op::ListVms => 1,
        Op::GetVm { .. } => 2,
        Op::Start { .. } => 3,
        Op::Shutdown { .. } => 4,
        Op::Restart { .. } => 5,
        Op::Pause { .. } => 6,
        Op::Resume { .. } => 7,
        Op::Resize { .. } => 8,
        Op::GetOperation { .. } => 9,
        Op::WaitOperation { .. } => 10,
        Op::Watch { .. } => 11,
        Op::Rights => 12,
    }
}

const REPLIES: usize = 7;

fn reply_index(reply: &Reply) -> usize {
    match reply {
        Reply::Host(_) => 0,
        Reply::Vms(_) => 1,
        Reply::Vm(_) => 2,
        Reply::Accepted(_) => 3,
        Reply::Operation(_) => 4,
        Reply::Changed(_) => 5,
        Reply::Rights(_) => 6,
    }
}

const ERRORS: usize = 13;

fn error_index(err: &ErrorReply) -> usize {
    match err {
        ErrorReply::Unauthenticated => 0,
        ErrorReply::Forbidden { .. } => 1,
        ErrorReply::NotFound { .. } => 2,
        ErrorReply::Busy { .. } => 3,
        ErrorReply::Unsupported { .. } => 4,
        ErrorReply::InvalidArgument { .. } => 5,
        ErrorReply::Timeout => 6,
        ErrorReply::Unavailable { .. } => 7,
        ErrorReply::Internal => 8,
        ErrorReply::VersionMismatch { .. } => 9,
        ErrorReply::Malformed { .. } => 10,
        ErrorReply::Failed { .. } => 11,
        ErrorReply::LimitExceeded { .. } => 12,
    }
}

/// The variants (of `n`) that 2000 deterministic samples of `strategy`
/// never produce.
fn variants_missed<T: std::fmt::Debug>(
    strategy: impl Strategy<Value = T>,
    n: usize,
    index: impl Fn(&T) -> usize,
) -> Vec<usize> {
    let mut runner = TestRunner::deterministic();
    let mut hit = vec![false; n];
    for _ in 0..2000 {
        let value = strategy
            .new_tree(&mut runner)
            .expect("strategies here never reject")
            .current();
        hit[index(&value)] = true;
    }
    (0..n).filter(|&i| !hit[i]).collect()
}

#[test]
fn strategies_cover_every_variant() {
    let missing = variants_missed(op(), OPS, op_index);
    assert!(
        missing.is_empty(),
        "Op variants without a strategy: {missing:?}"
    );
    let missing = variants_missed(reply(), REPLIES, reply_index);
    assert!(
        missing.is_empty(),
        "Reply variants without a strategy: {missing:?}"
    );
    let missing = variants_missed(error_reply(), ERRORS, error_index);
    assert!(
        missing.is_empty(),
        "ErrorReply variants without a strategy: {missing:?}"
    );
}

// ---- Frames ----------------------------------------------------------------

/// Encodes `msg` as a frame, reads the header back and decodes the body.
fn assert_round_trip<T>(msg: &T, max: u32) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let wire = frame::encode(msg, max).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    let header: [u8; HEADER_LEN] = wire[..HEADER_LEN].try_into().expect("a frame has a header");
    let len = frame::body_len(header, max).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(len, wire.len() - HEADER_LEN);
    let back: T = frame::decode(&wire[HEADER_LEN..])
        .map_err(|e| TestCaseError::fail(format!("decode: {e}")))?;
    prop_assert_eq!(&back, msg);
    // Appending to a buffer that already holds data writes the same frame.
    let mut appended = vec![0xaa; 3];
    frame::encode_into(msg, max, &mut appended)
        .map_err(|e| TestCaseError::fail(format!("encode_into: {e}")))?;
    prop_assert_eq!(&appended[..3], &[0xaa; 3]);
    prop_assert_eq!(&appended[3..], &wire[..]);
    Ok(())
}

/// Every strict prefix of a frame body fails to decode (postcard is
/// prefix-free per type), and never panics.
fn assert_truncations_fail<T>(msg: &T, max: u32) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let wire = frame::encode(msg, max).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    let body = &wire[HEADER_LEN..];
    for cut in 0..body.len() {
        prop_assert!(
            frame::decode::<T>(&body[..cut]).is_err(),
            "a {cut}-byte prefix of a {}-byte body decoded",
            body.len()
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn requests_round_trip(req in request()) {
        assert_round_trip(&req, MAX_REQUEST_FRAME)?;
        let wire = frame::encode(&req, MAX_REQUEST_FRAME).expect("a request fits");
        prop_assert_eq!(frame::peek_request_id(&wire[HEADER_LEN..]), Some(req.id));
    }

    #[test]
    fn responses_round_trip(resp in response()) {
        assert_round_trip(&resp, MAX_REPLY_FRAME)?;
    }

    #[test]
    fn hellos_round_trip(hello in hello()) {
        assert_round_trip(&hello, MAX_REQUEST_FRAME)?;
    }

    #[test]
    fn hello_replies_round_trip(reply in hello_reply()) {
        assert_round_trip(&reply, MAX_REPLY_FRAME)?;
    }

    #[test]
    fn truncated_requests_never_decode(req in request()) {
        assert_truncations_fail(&req, MAX_REQUEST_FRAME)?;
    }

    #[test]
    fn truncated_responses_never_decode(resp in response()) {
        assert_truncations_fail(&resp, MAX_REPLY_FRAME)?;
    }

    #[test]
    fn body_len_never_accepts_more_than_the_limit(len in any::<u32>(), max in any::<u32>()) {
        match frame::body_len(len.to_be_bytes(), max) {
            Ok(n) => {
                prop_assert!(len <= max);
                prop_assert_eq!(n as u64, u64::from(len));
            }
            Err(FrameError::TooLarge { len: got, max: limit }) => {
                prop_assert!(len > max);
                prop_assert_eq!(got, u64::from(len));
                prop_assert_eq!(limit, max);
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn encode_never_exceeds_the_limit(req in request(), max in 0u32..64) {
        match frame::encode(&req, max) {
            Ok(wire) => prop_assert!(wire.len() - HEADER_LEN <= max as usize),
            Err(FrameError::TooLarge { len, .. }) => prop_assert!(len > u64::from(max)),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn arbitrary_bodies_never_panic(body in vec(any::<u8>(), 0..512)) {
        check_body::<Request>(&body, MAX_REQUEST_FRAME)?;
        check_body::<Response>(&body, MAX_REPLY_FRAME)?;
        check_body::<Hello>(&body, MAX_REQUEST_FRAME)?;
        check_body::<HelloReply>(&body, MAX_REPLY_FRAME)?;
        if let Ok(req) = frame::decode::<Request>(&body) {
            prop_assert_eq!(frame::peek_request_id(&body), Some(req.id));
        }
    }

    #[test]
    fn mutated_requests_never_panic(
        req in request(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut body = frame::encode(&req, MAX_REQUEST_FRAME).expect("fits")[HEADER_LEN..].to_vec();
        for (at, byte) in flips {
            let at = at.index(body.len());
            body[at] = byte;
        }
        check_body::<Request>(&body, MAX_REQUEST_FRAME)?;
        if let Ok(req) = frame::decode::<Request>(&body) {
            prop_assert_eq!(frame::peek_request_id(&body), Some(req.id));
        }
    }
}

/// Decoding `body` as a `T` does not panic, and whatever decodes
/// re-encodes within `max` to bytes that decode to the same value. (Not
/// necessarily to the same bytes: postcard also reads non-minimal varints.)
fn check_body<T>(body: &[u8], max: u32) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = frame::decode::<T>(body) {
        let again = frame::encode(&msg, max).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(again.len() - HEADER_LEN <= body.len());
        prop_assert_eq!(frame::decode::<T>(&again[HEADER_LEN..]).ok(), Some(msg));
    }
    Ok(())
}

// ---- Codec -----------------------------------------------------------------

#[cfg(feature = "codec")]
mod codec {
    use bytes::BytesMut;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use tokio_util::codec::Decoder;
    use vmd_proto::codec::FrameCodec;
    use vmd_proto::frame::{self, HEADER_LEN, MAX_REQUEST_FRAME};
    use vmd_proto::{Request, Response};

    use super::request;

    /// What the decoder said, comparable across runs.
    #[derive(Debug, PartialEq)]
    enum Event {
        Request(Request),
        Undecodable {
            body: Vec<u8>,
            error: String,
        },
        /// A framing error; the decoder is not used after it.
        Fatal(String),
        /// `decode_eof` found nothing left.
        CleanEof,
    }

    /// Pieces of a byte stream: valid frames, well-framed garbage, and raw
    /// garbage (whose first bytes usually make an oversized header).
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => request().prop_map(|r| frame::encode(&r, MAX_REQUEST_FRAME).expect("fits")),
            2 => vec(any::<u8>(), 0..48).prop_map(|body| {
                let len = u32::try_from(body.len()).expect("short body");
                let mut wire = len.to_be_bytes().to_vec();
                wire.extend(body);
                wire
            }),
            1 => vec(any::<u8>(), 0..16),
        ]
    }

    /// Feeds `chunks` one after another, draining the decoder after each,
    /// then signals end of stream. Checks the buffering bound throughout.
    fn run(chunks: &[&[u8]], max_in: u32) -> Result<Vec<Event>, TestCaseError> {
        let mut codec = FrameCodec::<Request, Response>::new(max_in, MAX_REQUEST_FRAME);
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        let bound = max_in as usize + HEADER_LEN;
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(Ok(req))) => events.push(Event::Request(req)),
                    Ok(Some(Err(bad))) => events.push(Event::Undecodable {
                        body: bad.body.to_vec(),
                        error: bad.error.to_string(),
                    }),
                    Ok(None) => break,
                    Err(e) => {
                        events.push(Event::Fatal(e.to_string()));
                        return Ok(events);
                    }
                }
            }
            // Whatever is left is less than one frame of at most `max_in`.
            prop_assert!(
                buf.len() < bound,
                "{} bytes buffered with a {max_in}-byte limit",
                buf.len()
            );
        }
        events.push(match codec.decode_eof(&mut buf) {
            Ok(None) => Event::CleanEof,
            Ok(Some(_)) => return Err(TestCaseError::fail("eof found a frame decode missed")),
            Err(e) => Event::Fatal(e.to_string()),
        });
        Ok(events)
    }

    /// `stream` cut at the given points (sorted, deduplicated).
    fn split<'a>(stream: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        at.sort_unstable();
        at.dedup();
        let mut chunks = Vec::new();
        let mut start = 0;
        for end in at.into_iter().chain([stream.len()]) {
            chunks.push(&stream[start..end]);
            start = end;
        }
        chunks
    }

    proptest! {
        #[test]
        fn any_split_yields_the_same_frames(
            pieces in vec(piece(), 0..8),
            cuts in vec(any::<prop::sample::Index>(), 0..24),
            max_in in prop_oneof![Just(MAX_REQUEST_FRAME), 0u32..96],
        ) {
            let stream = pieces.concat();
            let whole = run(&[&stream], max_in)?;
            let chunked = run(&split(&stream, &cuts), max_in)?;
            prop_assert_eq!(chunked, whole);
            // Byte by byte, the most extreme split.
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            prop_assert_eq!(run(&bytes, max_in)?, run(&[&stream], max_in)?);
        }

        #[test]
        fn valid_frames_come_out_as_sent(
            requests in vec(request(), 0..8),
            cuts in vec(any::<prop::sample::Index>(), 0..24),
        ) {
            let mut stream = Vec::new();
            for req in &requests {
                frame::encode_into(req, MAX_REQUEST_FRAME, &mut stream).expect("fits");
            }
            let mut expected: Vec<Event> = requests.into_iter().map(Event::Request).collect();
            expected.push(Event::CleanEof);
            prop_assert_eq!(run(&split(&stream, &cuts), MAX_REQUEST_FRAME)?, expected);
        }
    }
}
