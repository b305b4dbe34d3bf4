//! Resuming a snapshot as data: the QMP steps a launcher runs, in order, on the QMP socket of
//! a QEMU started with `-incoming defer` ([`Vm::resume_steps`]).
//!
//! 1. `migrate-set-capabilities` `x-ignore-shared` on: the state holds no RAM, the RAM is the
//!    memory-backend file (vamem's mount) and must be left as it is;
//! 2. `migrate-incoming` `file:STATE`;
//! 3. poll `query-migrate` until its `status` is `completed` (fail on `failed`/`cancelled`);
//! 4. `cont` (the snapshot was saved stopped).
//!
//! Each [`Step`] serialises to JSON (`{"step":"qmp","execute":...,"arguments":...}`,
//! `{"step":"wait","execute":"query-migrate","field":"status","until":[...],"fail":[...],
//! "timeout_secs":N}`), so a launcher in any language can run them; [`Step::message`] is the
//! QMP command line to send, [`Step::check`] judges a `wait` step's reply.

use serde::Serialize;
use serde_json::{json, Value};

use crate::vm::Vm;

/// How long the `wait` step of a resume may take.
pub const MIGRATE_TIMEOUT_SECS: u64 = 300;

/// One QMP step.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Run a command once; it must succeed.
    Qmp {
        /// The command.
        execute: String,
        /// Its arguments.
        arguments: Value,
    },
    /// Run a query until `field` of its reply is one of `until`; fail when it is one of
    /// `fail` or after `timeout_secs`.
    Wait {
        /// The query command.
        execute: String,
        /// The field of its `return` value to look at.
        field: String,
        /// Values that end the wait.
        until: Vec<String>,
        /// Values that fail it.
        fail: Vec<String>,
        /// Seconds before giving up.
        timeout_secs: u64,
    },
}

/// What a reply to a [`Step::Wait`] query says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitState {
    /// Done: go on with the next step.
    Done,
    /// Not yet: ask again (after a short sleep).
    Pending(String),
    /// It failed, with QEMU's reason if it gave one.
    Failed(String),
}

impl Step {
    /// The QMP message to send: `{"execute": ..., "arguments": ...}`.
    pub fn message(&self) -> Value {
        match self {
            Step::Qmp { execute, arguments } => {
                json!({"execute": execute, "arguments": arguments})
            }
            Step::Wait { execute, .. } => json!({"execute": execute}),
        }
    }

    /// For a `wait` step: what the `return` value of its query says. Other steps are done
    /// once they returned.
    pub fn check(&self, ret: &Value) -> WaitState {
        let Step::Wait {
            field, until, fail, ..
        } = self
        else {
            return WaitState::Done;
        };
        let v = ret.get(field).and_then(Value::as_str).unwrap_or("");
        if until.iter().any(|u| u == v) {
            WaitState::Done
        } else if fail.iter().any(|f| f == v) {
            let why = ret
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("QEMU gave no reason");
            WaitState::Failed(format!("{field} {v}: {why}"))
        } else {
            WaitState::Pending(v.to_string())
        }
    }
}

impl Vm {
    /// The QMP steps that resume this VM's snapshot; empty for a cold boot.
    pub fn resume_steps(&self) -> Vec<Step> {
        let Some(state) = &self.incoming else {
            return Vec::new();
        };
        vec![
            Step::Qmp {
                execute: "migrate-set-capabilities".into(),
                arguments: json!({"capabilities": [
                    {"capability": "x-ignore-shared", "state": true}
                ]}),
            },
            Step::Qmp {
                execute: "migrate-incoming".into(),
                arguments: json!({"uri": format!("file:{}", state.to_string_lossy())}),
            },
            Step::Wait {
                execute: "query-migrate".into(),
                field: "status".into(),
                until: vec!["completed".into()],
                fail: vec!["failed".into(), "cancelled".into()],
                timeout_secs: MIGRATE_TIMEOUT_SECS,
            },
            Step::Qmp {
                execute: "cont".into(),
                arguments: json!({}),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Machine;
    use crate::vm::{Accel, Attachments};

    fn vm(state: Option<&str>) -> Vm {
        let m = Machine::parse(
            br#"{"format":"vastream-machine-v2","machine":"pc-q35-10.0","ram_size":4096}"#,
        )
        .unwrap();
        let a = Attachments {
            accel: Accel::Tcg,
            mem_path: Some("/run/va/mem/mem".into()),
            state: state.map(Into::into),
            ..Attachments::default()
        };
        Vm::from_machine(&m, &a).unwrap()
    }

    #[test]
    fn resume_steps_in_order_and_as_json() {
        let steps = vm(Some("/run/va/state")).resume_steps();
        let names: Vec<String> = steps
            .iter()
            .map(|s| s.message()["execute"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "migrate-set-capabilities",
                "migrate-incoming",
                "query-migrate",
                "cont"
            ]
        );
        let j = serde_json::to_value(&steps).unwrap();
        assert_eq!(j[0]["step"], "qmp");
        assert_eq!(
            j[0]["arguments"]["capabilities"][0],
            json!({"capability": "x-ignore-shared", "state": true})
        );
        assert_eq!(j[1]["arguments"]["uri"], "file:/run/va/state");
        assert_eq!(j[2]["step"], "wait");
        assert_eq!(j[2]["until"], json!(["completed"]));
        assert_eq!(j[2]["timeout_secs"], MIGRATE_TIMEOUT_SECS);
        assert_eq!(
            j[3],
            json!({"step": "qmp", "execute": "cont", "arguments": {}})
        );
        assert!(vm(None).resume_steps().is_empty());
    }

    #[test]
    fn wait_step_judges_replies() {
        let steps = vm(Some("/s")).resume_steps();
        let w = &steps[2];
        assert_eq!(w.check(&json!({"status": "completed"})), WaitState::Done);
        assert_eq!(
            w.check(&json!({"status": "active"})),
            WaitState::Pending("active".into())
        );
        assert_eq!(w.check(&json!({})), WaitState::Pending(String::new()));
        match w.check(&json!({"status": "failed", "error-desc": "Unknown ramblock"})) {
            WaitState::Failed(m) => assert!(m.contains("Unknown ramblock"), "{m}"),
            s => panic!("{s:?}"),
        }
        assert_eq!(steps[0].check(&json!({})), WaitState::Done);
    }
}
