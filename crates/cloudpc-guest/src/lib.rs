//! Talking to the guest through the QEMU guest agent: no network path from guest to control plane
//! is needed. [`GuestAgent`] wraps the agent protocol (ping, exec, OS and disk inventory);
//! [`config`] holds the post-provisioning steps built on it.

pub mod config;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use cloudpc_hypervisor::{Hypervisor, HypervisorError};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("the guest agent did not answer within {0:?}")]
    NotReady(Duration),
    #[error(transparent)]
    Agent(#[from] HypervisorError),
    #[error("{command} exited with {code}: {stderr}")]
    Failed { command: String, code: i64, stderr: String },
    #[error("{command} did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("the guest answered something unexpected: {0}")]
    Protocol(String),
}

pub type Result<T, E = GuestError> = std::result::Result<T, E>;

/// What a program run in the guest printed and returned.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

pub struct GuestAgent<'a> {
    hv: &'a dyn Hypervisor,
    vm: &'a str,
}

/// The agent is momentarily unreachable (libvirt has not re-attached its channel yet), as
/// opposed to refusing the command.
fn agent_away(e: &GuestError) -> bool {
    matches!(e, GuestError::Agent(HypervisorError::Agent { message, .. })
        if message.contains("not connected") || message.contains("not responding"))
}

fn agent_not_connected(e: &GuestError) -> bool {
    matches!(e, GuestError::Agent(HypervisorError::Agent { message, .. }) if message.contains("not connected"))
}

impl<'a> GuestAgent<'a> {
    pub fn new(hv: &'a dyn Hypervisor, vm: &'a str) -> Self {
        Self { hv, vm }
    }

    async fn call(&self, execute: &str, arguments: Option<Value>, timeout: i32) -> Result<Value> {
        let mut cmd = json!({ "execute": execute });
        if let Some(a) = arguments {
            cmd["arguments"] = a;
        }
        Ok(self.hv.agent(self.vm, &cmd, timeout).await?)
    }

    /// After the agent was away: waits a second and says whether to ask again. Only while the VM
    /// runs (an agent that went away because the guest shut down will not answer), and for at
    /// most a minute; asked seldom, since libvirt 9.0 has crashed on agent calls racing an agent
    /// that goes away.
    async fn may_come_back(&self, begin: Instant, timeout: Duration) -> bool {
        if begin.elapsed() >= timeout.min(Duration::from_secs(60)) {
            return false;
        }
        if !matches!(self.hv.state(self.vm).await, Ok(cloudpc_hypervisor::VmState::Running)) {
            return false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        true
    }

    pub async fn ping(&self) -> Result<()> {
        self.call("guest-ping", None, 2).await.map(|_| ())
    }

    /// Polls until the agent answers; returns how long that took.
    pub async fn wait_ready(&self, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if self.ping().await.is_ok() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                return Err(GuestError::NotReady(limit));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Runs a program in the guest, feeding `stdin`, and waits for it to exit.
    pub async fn exec(&self, path: &str, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<ExecOutput> {
        let mut a = json!({ "path": path, "arg": args, "capture-output": true });
        if let Some(input) = stdin {
            a["input-data"] = json!(B64.encode(input));
        }
        let begin = Instant::now();
        let started = loop {
            match self.call("guest-exec", Some(a.clone()), 10).await {
                // Not connected: the command never reached the guest, so sending it again is safe.
                Err(e) if agent_not_connected(&e) && self.may_come_back(begin, timeout).await => {}
                other => break other?,
            }
        };
        let pid = started["pid"].as_i64().ok_or_else(|| GuestError::Protocol(started.to_string()))?;
        let mut pause = Duration::from_millis(2);
        loop {
            let st = match self.call("guest-exec-status", Some(json!({ "pid": pid })), 10).await {
                // libvirt loses the agent channel for a moment when libvirtd restarts; the program
                // goes on in the guest, so its status is asked again until the step's time is up.
                Err(e) if agent_away(&e) && self.may_come_back(begin, timeout).await => continue,
                other => other?,
            };
            if st["exited"].as_bool() == Some(true) {
                let text = |k: &str| {
                    st[k]
                        .as_str()
                        .and_then(|s| B64.decode(s).ok())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                };
                return Ok(ExecOutput {
                    code: st["exitcode"].as_i64().unwrap_or(-1),
                    stdout: text("out-data"),
                    stderr: text("err-data"),
                });
            }
            if begin.elapsed() > timeout {
                return Err(GuestError::Timeout { command: path.to_string(), timeout });
            }
            tokio::time::sleep(pause).await;
            // Short programs finish in milliseconds; long ones (resize2fs) need not be polled hard.
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Runs a shell script (passed on stdin, so secrets never show in the guest's process list)
    /// and fails unless it exits 0.
    pub async fn script(&self, what: &str, script: &str, timeout: Duration) -> Result<String> {
        let out = self.exec("/bin/sh", &["-s"], Some(script.as_bytes()), timeout).await?;
        if out.code != 0 {
            return Err(GuestError::Failed {
                command: what.to_string(),
                code: out.code,
                stderr: out.stderr.trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    pub async fn os_info(&self) -> Result<Value> {
        self.call("guest-get-osinfo", None, 5).await
    }

    pub async fn fs_info(&self) -> Result<Value> {
        self.call("guest-get-fsinfo", None, 5).await
    }

    pub async fn network_interfaces(&self) -> Result<Value> {
        self.call("guest-network-get-interfaces", None, 5).await
    }
}
