//! `vmctl list --all-hosts`: every named host of the config file at once.
//!
//! 1. Each `[hosts.NAME]` gets its own settings (its endpoints and TLS
//!    files, the flags on top) and its own task; all run concurrently.
//! 2. A task connects (each step bounded by the connect timeout) and asks
//!    for the VM list (bounded by the same timeout).
//! 3. The answers make one table, sorted by host then VM; a host that did
//!    not answer is one row that says why, and the exit code is then
//!    [`crate::SOME_HOST_SILENT`].

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use vmd_client::{Client, ClientConfig, ClientError, error_chain};
use vmd_proto::VmInfo;

use crate::{Args, Failure, SOME_HOST_SILENT, apply_flags, config_file, output, with_file};

/// Why a host gave no VM list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Silent {
    /// `unreachable` (no connection, or no answer in time) or `error`
    /// (its settings cannot be used, or it answered with an error).
    pub(crate) state: &'static str,
    /// What happened, for a person.
    pub(crate) error: String,
}

/// What one host answered.
pub(crate) type HostAnswer = Result<Vec<VmInfo>, Silent>;

/// Runs `vmctl list --all-hosts`.
pub(crate) async fn list_all(args: &Args) -> Result<(), Failure> {
    if args.host.is_some() || !args.connect.endpoint.is_empty() {
        return Err(Failure::Usage(
            "--all-hosts asks every [hosts.NAME] of the config file: not with --host or --endpoint"
                .into(),
        ));
    }
    if args.connect.dev {
        return Err(Failure::Usage(
            "--all-hosts asks the hosts of the config file; --dev uses none".into(),
        ));
    }
    let (config, file) = config_file(args)?;
    if config.hosts.is_empty() {
        let err = std::io::Error::other("--all-hosts needs [hosts.NAME] tables");
        return Err(Failure::Usage(with_file(&err, file.as_deref())));
    }
    let mut hosts = Vec::new();
    for name in config.hosts.keys() {
        let mut host = config
            .for_host(name)
            .map_err(|e| Failure::Usage(with_file(&e, file.as_deref())))?;
        apply_flags(&mut host, args)?;
        hosts.push((name.clone(), host));
    }
    let answers: Vec<(String, HostAnswer)> = join_all(
        hosts
            .into_iter()
            .map(|(name, host)| async move { (name, ask(&host).await) }),
    )
    .await;
    let text = if args.json {
        serde_json::to_string_pretty(&to_json(&answers))
            .map_err(|e| Failure::Usage(format!("cannot format output: {e}")))?
    } else {
        output::hosts_table(&answers)
    };
    println!("{}", text.trim_end());
    if answers.iter().any(|(_, answer)| answer.is_err()) {
        return Err(Failure::Silent(SOME_HOST_SILENT));
    }
    Ok(())
}

/// One host's VM list, or why there is none.
async fn ask(config: &ClientConfig) -> HostAnswer {
    let error = |e: Failure| Silent {
        state: "error",
        error: match e {
            Failure::Usage(m) | Failure::Connect(m) | Failure::Server(m) => m,
            Failure::Silent(code) => format!("exit {code}"),
        },
    };
    let tls = crate::load_tls(config, "").map_err(error)?;
    let options = crate::connect_options(config);
    let client = Client::connect_any(&config.endpoints, &tls, &options)
        .await
        .map_err(|e| match e {
            ClientError::Refused(_) => Silent {
                state: "error",
                error: error_chain(&e),
            },
            e => Silent {
                state: "unreachable",
                error: error_chain(&e),
            },
        })?;
    if client.welcome().role.is_none() {
        return Err(Silent {
            state: "error",
            error: format!(
                "the server grants this certificate ({}) no rights",
                client.welcome().identity
            ),
        });
    }
    let answer = match tokio::time::timeout(config.connect_timeout, client.list_vms()).await {
        Ok(Ok(vms)) => Ok(vms),
        Ok(Err(e @ ClientError::Server(_))) => Err(Silent {
            state: "error",
            error: error_chain(&e),
        }),
        Ok(Err(e)) => Err(Silent {
            state: "unreachable",
            error: error_chain(&e),
        }),
        Err(_) => Err(Silent {
            state: "unreachable",
            error: format!("no answer within {}", millis(config.connect_timeout)),
        }),
    };
    client.close().await;
    answer
}

fn millis(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// The JSON form: one array, each VM's info with a `host` field, and
/// `{"host": …, "state": "unreachable" | "error", "error": …}` for a host
/// without a list.
pub(crate) fn to_json(answers: &[(String, HostAnswer)]) -> Value {
    let mut rows = Vec::new();
    for (host, answer) in answers {
        match answer {
            Ok(vms) => {
                for vm in vms {
                    let mut value = serde_json::to_value(vm).unwrap_or(Value::Null);
                    if let Value::Object(map) = &mut value {
                        map.insert("host".into(), json!(host));
                    }
                    rows.push(value);
                }
            }
            Err(silent) => {
                rows.push(json!({"host": host, "state": silent.state, "error": silent.error}));
            }
        }
    }
    Value::Array(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmInfo {
        serde_json::from_value(json!({
            "name": name, "description": null, "hypervisor": "qemu", "state": "running",
            "autostart": true, "protected": false, "vsock_cid": 5,
            "vcpus": {"declared": 2, "current": 2, "max": 4},
            "memory": {"declared": 536870912, "current": null, "balloon_actual": null, "max": null},
            "pid": 7, "uptime_secs": 3, "cgroup_memory": null, "cpu_time_ns": null,
            "tasks": null, "pending": null
        }))
        .expect("a VmInfo")
    }

    fn answers() -> Vec<(String, HostAnswer)> {
        vec![
            ("edge-1".into(), Ok(vec![vm("a-vm"), vm("b-vm")])),
            (
                "edge-2".into(),
                Err(Silent {
                    state: "unreachable",
                    error: "cannot connect to tcp://10.0.0.2:9876: timed out".into(),
                }),
            ),
            ("edge-3".into(), Ok(vec![])),
        ]
    }

    #[test]
    fn json_adds_the_host_and_reports_the_silent_one() {
        let json = to_json(&answers());
        let rows = json.as_array().expect("an array");
        assert_eq!(rows.len(), 3, "{json}");
        assert_eq!(rows[0]["host"], "edge-1");
        assert_eq!(rows[0]["name"], "a-vm");
        assert_eq!(rows[0]["state"], "running");
        assert_eq!(rows[1]["name"], "b-vm");
        assert_eq!(
            rows[2],
            json!({"host": "edge-2", "state": "unreachable",
                   "error": "cannot connect to tcp://10.0.0.2:9876: timed out"})
        );
    }

    #[test]
    fn the_table_has_a_host_column_and_a_row_for_the_silent_host() {
        let table = output::hosts_table(&answers());
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("HOST    NAME  STATE"), "{table}");
        assert!(lines[0].ends_with("ERROR"), "{table}");
        assert!(lines[1].starts_with("edge-1  a-vm  running"), "{table}");
        assert!(lines[2].starts_with("edge-1  b-vm  running"), "{table}");
        assert!(lines[3].starts_with("edge-2  -     unreachable"), "{table}");
        assert!(lines[3].ends_with("timed out"), "{table}");
        assert_eq!(lines.len(), 4, "a host without VMs has no row: {table}");
    }
}
