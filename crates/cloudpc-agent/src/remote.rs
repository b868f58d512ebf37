//! The control plane's side of a host agent: a [`Hypervisor`] whose every operation is a call to
//! the agent over mutual TLS.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header;

use cloudpc_hypervisor::{
    Accelerator, ConsoleStream, FileReader, HostConfig, Hypervisor, HypervisorError, NetworkSpec, NicSpec, Result,
    VmSpec, VmState,
};

use crate::protocol::{Call, HostReport, CONSOLE_UPGRADE, PROTOCOL, PROTOCOL_HEADER};

/// Longest a call other than a guest-agent command may take (an overlay of a large image).
const CALL_LIMIT: Duration = Duration::from_secs(300);
/// A status poll that takes longer than this counts as a missed report.
pub const STATUS_LIMIT: Duration = Duration::from_secs(3);

pub struct RemoteHost {
    config: HostConfig,
    accelerator: Accelerator,
    address: String,
    client: reqwest::Client,
    /// Without a total timeout: a console stays open as long as its user keeps it.
    console_client: reqwest::Client,
}

impl RemoteHost {
    /// `address` is the agent's `https://host:port`; `tls` the replica's client configuration.
    pub fn new(config: HostConfig, accelerator: Accelerator, address: &str, tls: rustls::ClientConfig) -> Result<Self> {
        let build = |timeout: Option<Duration>| {
            let mut b = reqwest::Client::builder()
                .use_preconfigured_tls(tls.clone())
                .connect_timeout(Duration::from_secs(3))
                .pool_idle_timeout(Duration::from_secs(30))
                .http1_only()
                .no_proxy();
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            b.build().map_err(|e| HypervisorError::Io(format!("cannot set up the client for host agents: {e}")))
        };
        Ok(Self {
            config,
            accelerator,
            address: address.trim_end_matches('/').to_string(),
            client: build(Some(CALL_LIMIT))?,
            console_client: build(None)?,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> HypervisorError {
        HypervisorError::Unreachable { host: self.config.name.clone(), message: e.to_string() }
    }

    /// Sends a request with the protocol header; a transport failure says the agent is unreachable.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        req.header(PROTOCOL_HEADER, PROTOCOL).send().await.map_err(|e| self.unreachable(error_chain(&e)))
    }

    /// An answer that is not a success, as an error with the agent's reason.
    async fn refused(&self, resp: reqwest::Response) -> HypervisorError {
        let status = resp.status();
        HypervisorError::Io(format!(
            "the agent of host '{}' answered {status}: {}",
            self.config.name,
            resp.text().await.unwrap_or_default()
        ))
    }

    /// Sends, and refuses anything but a success.
    async fn send_ok(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = self.send(req).await?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.refused(resp).await)
        }
    }

    /// The monitor's poll: what the agent reports, within [`STATUS_LIMIT`].
    pub async fn status(&self) -> Result<HostReport> {
        let resp = self.send_ok(self.client.get(format!("{}/v1/status", self.address)).timeout(STATUS_LIMIT)).await?;
        resp.json().await.map_err(|e| self.unreachable(e))
    }

    async fn call(&self, call: Call, limit: Duration) -> Result<serde_json::Value> {
        let resp =
            self.send_ok(self.client.post(format!("{}/v1/call", self.address)).timeout(limit).json(&call)).await?;
        resp.json::<Result<serde_json::Value>>().await.map_err(|e| self.unreachable(e))?
    }

    async fn unit(&self, call: Call) -> Result<()> {
        self.call(call, CALL_LIMIT).await.map(|_| ())
    }

    async fn typed<T: serde::de::DeserializeOwned>(&self, call: Call) -> Result<T> {
        let v = self.call(call, CALL_LIMIT).await?;
        serde_json::from_value(v).map_err(|e| self.unreachable(format!("the agent's answer is not understood: {e}")))
    }
}

/// The agent places files by name; the control plane's path says which.
fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| HypervisorError::Io(format!("'{}' names no file", path.display())))
}

/// reqwest's errors hide their cause (refused, timed out, certificate) in the source chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[async_trait]
impl Hypervisor for RemoteHost {
    fn config(&self) -> &HostConfig {
        &self.config
    }

    fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    async fn create_overlay(&self, base: &Path, overlay: &Path, size_gib: u64) -> Result<()> {
        self.unit(Call::CreateOverlay { base: base.into(), overlay: overlay.into(), size_gib }).await
    }

    async fn remove_file(&self, path: &Path) -> Result<()> {
        self.unit(Call::RemoveFile { path: path.into() }).await
    }

    async fn define_vm(&self, spec: &VmSpec) -> Result<()> {
        self.unit(Call::DefineVm { spec: spec.clone() }).await
    }

    async fn remove_vm(&self, name: &str) -> Result<()> {
        self.unit(Call::RemoveVm { name: name.into() }).await
    }

    async fn state(&self, name: &str) -> Result<VmState> {
        self.typed(Call::State { name: name.into() }).await
    }

    async fn list_vms(&self, prefix: &str) -> Result<Vec<String>> {
        self.typed(Call::ListVms { prefix: prefix.into() }).await
    }

    async fn domain_xml(&self, name: &str) -> Result<String> {
        self.typed(Call::DomainXml { name: name.into() }).await
    }

    async fn start(&self, name: &str) -> Result<()> {
        self.unit(Call::Start { name: name.into() }).await
    }

    async fn power_off(&self, name: &str) -> Result<()> {
        self.unit(Call::PowerOff { name: name.into() }).await
    }

    async fn reboot(&self, name: &str) -> Result<()> {
        self.unit(Call::Reboot { name: name.into() }).await
    }

    async fn save(&self, name: &str) -> Result<()> {
        self.unit(Call::Save { name: name.into() }).await
    }

    async fn resume(&self, name: &str) -> Result<cloudpc_hypervisor::Resumed> {
        self.typed(Call::Resume { name: name.into() }).await
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<()> {
        self.unit(Call::EnsureNetwork { spec: spec.clone() }).await
    }

    async fn ensure_isolation_filter(&self) -> Result<String> {
        self.typed(Call::EnsureIsolationFilter).await
    }

    async fn ensure_block_rdp_filter(&self) -> Result<String> {
        self.typed(Call::EnsureBlockRdpFilter).await
    }

    async fn attach_nic(&self, vm: &str, nic: &NicSpec) -> Result<()> {
        self.unit(Call::AttachNic { vm: vm.into(), nic: nic.clone() }).await
    }

    async fn detach_nic(&self, vm: &str, mac: &str) -> Result<()> {
        self.unit(Call::DetachNic { vm: vm.into(), mac: mac.into() }).await
    }

    async fn set_nic_filter(&self, vm: &str, nic: &NicSpec) -> Result<()> {
        self.unit(Call::SetNicFilter { vm: vm.into(), nic: nic.clone() }).await
    }

    async fn vnc_port(&self, name: &str) -> Result<Option<u16>> {
        self.typed(Call::VncPort { name: name.into() }).await
    }

    async fn agent(&self, vm: &str, command: &serde_json::Value, timeout_secs: i32) -> Result<serde_json::Value> {
        let limit = Duration::from_secs(timeout_secs.max(1) as u64 + 30);
        self.call(Call::Agent { vm: vm.into(), command: command.clone(), timeout_secs }, limit).await
    }

    async fn network_check(
        &self,
        spec: &cloudpc_hypervisor::netcheck::NetworkCheckSpec,
    ) -> Result<Vec<cloudpc_hypervisor::netcheck::CheckResult>> {
        let v = self.call(Call::NetworkCheck { spec: spec.clone() }, Duration::from_secs(30)).await?;
        serde_json::from_value(v)
            .map_err(|e| HypervisorError::Io(format!("the agent's check results are unreadable: {e}")))
    }

    async fn disable_computer(
        &self,
        spec: &cloudpc_hypervisor::netcheck::NetworkCheckSpec,
        name: &str,
    ) -> Result<String> {
        let v =
            self.call(Call::DisableComputer { spec: spec.clone(), name: name.into() }, Duration::from_secs(30)).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    fn ships_images(&self) -> bool {
        true
    }

    async fn ensure_image(&self, sha256: &str, source: &Path) -> Result<std::path::PathBuf> {
        let url = format!("{}/v1/images/{sha256}", self.address);
        let resp = self.send(self.client.get(&url)).await?;
        if resp.status().is_success() {
            return resp.json().await.map_err(|e| self.unreachable(e));
        }
        let file = tokio::fs::File::open(source)
            .await
            .map_err(|e| HypervisorError::Io(format!("cannot read the image {}: {e}", source.display())))?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let resp = self.send_ok(self.console_client.put(&url).body(body)).await?;
        resp.json().await.map_err(|e| self.unreachable(e))
    }

    async fn retain_images(&self, keep: &[String]) -> Result<Vec<String>> {
        let req =
            self.client.post(format!("{}/v1/images/retain", self.address)).json(&serde_json::json!({ "keep": keep }));
        let resp = self.send_ok(req).await?;
        resp.json().await.map_err(|e| self.unreachable(e))
    }

    async fn export_file(&self, path: &Path) -> Result<Option<(FileReader, u64)>> {
        use futures_util::TryStreamExt;
        let name = file_name(path)?;
        let resp = self.send(self.console_client.get(format!("{}/v1/files/{name}", self.address))).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.refused(resp).await);
        }
        let len = resp.content_length().unwrap_or(0);
        let stream = resp.bytes_stream().map_err(std::io::Error::other);
        Ok(Some((Box::new(tokio_util::io::StreamReader::new(stream)), len)))
    }

    async fn import_file(&self, path: &Path, data: FileReader) -> Result<u64> {
        let name = file_name(path)?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(data));
        let resp =
            self.send_ok(self.console_client.put(format!("{}/v1/files/{name}", self.address)).body(body)).await?;
        resp.json().await.map_err(|e| self.unreachable(e))
    }

    /// The agent relays the VM's loopback console over an upgraded HTTPS connection.
    async fn open_console(&self, name: &str) -> Result<Box<dyn ConsoleStream>> {
        let req = self
            .console_client
            .get(format!("{}/v1/console/{name}", self.address))
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, CONSOLE_UPGRADE);
        let resp = self.send(req).await?;
        if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            return Err(self.refused(resp).await);
        }
        let stream = resp.upgrade().await.map_err(|e| self.unreachable(error_chain(&e)))?;
        Ok(Box::new(stream))
    }
}
