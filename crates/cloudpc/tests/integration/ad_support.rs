//! The test domain controller: a real Samba AD DC on a test "organisation network" (the bridge
//! `cpcorg0`, DHCP and DNS from the DC), run by `scripts/test-dc.sh`. A test that uses it holds
//! the VM turn for as long as the DC is up: the DC's host firewall rule and bridge must not meet
//! the VM tests' networks, and only one test may own the DC at a time.

use std::path::PathBuf;
use std::process::Command;

use crate::vm_support::{vm_turn, VmTurn};

pub const DOMAIN: &str = "corp.cloudpc.test";
pub const OU: &str = "OU=CloudPCs,DC=corp,DC=cloudpc,DC=test";
pub const JOIN_USER: &str = "cpcjoin";
pub const JOIN_PASSWORD: &str = "J0in!Pass-cpc";
pub const BRIDGE: &str = "cpcorg0";
/// The host's address on the organisation's network.
pub const HOST_IP: &str = "10.77.0.1";
pub const STATE: &str = "/run/cloudpc-test-dc/state";

/// The body of a good connection to the test domain (joins it; the DC's bridge).
pub fn hq_connection() -> serde_json::Value {
    serde_json::json!({"displayName": "HQ", "adDomainName": DOMAIN, "adDomainUsername": JOIN_USER,
                       "adDomainPassword": JOIN_PASSWORD, "organizationalUnit": OU, "bridgeName": BRIDGE})
}

/// A listener on the host's address on the organisation's network and its URL: the server's
/// `--public-url`, which the control-plane check reaches from that network.
pub fn public_listener() -> (std::net::TcpListener, String) {
    let public = std::net::TcpListener::bind((HOST_IP, 0)).unwrap();
    let url = format!("http://{HOST_IP}:{}", public.local_addr().unwrap().port());
    (public, url)
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-dc.sh")
}

fn dc(args: &[&str], env: &[(&str, &str)]) {
    let out = Command::new(script()).args(args).envs(env.iter().copied()).output().expect("run test-dc.sh");
    assert!(
        out.status.success(),
        "test-dc.sh {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The DC, up while this lives.
pub struct TestDc {
    _turn: VmTurn,
}

impl TestDc {
    pub async fn up() -> TestDc {
        Self::up_with(&[]).await
    }

    /// Brings the DC up with extra settings (`CPC_DC_VLAN=42`: only VLAN 42 of the bridge
    /// reaches it).
    pub async fn up_with(env: &[(&str, &str)]) -> TestDc {
        let turn = vm_turn().await;
        // A DC a failed run left behind goes first: the state must be this test's.
        dc(&["down"], &[]);
        dc(&["up"], env);
        TestDc { _turn: turn }
    }

    /// Restarts the DC's samba with extra settings (`CPC_DC_FAKETIME=+10m` skews its clock).
    pub fn restart(&self, env: &[(&str, &str)]) {
        dc(&["restart"], env);
    }

    /// The computer objects whose name starts with `prefix`, as the DC's own database lists them.
    pub fn computers(&self, prefix: &str) -> Vec<String> {
        let out = Command::new("ldbsearch")
            .args([
                "-H",
                &format!("{STATE}/dc/private/sam.ldb"),
                &format!("(&(objectClass=computer)(cn={prefix}*))"),
                "cn",
            ])
            .output()
            .expect("ldbsearch");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("cn: ").map(str::to_string))
            .collect()
    }
}

impl TestDc {
    /// Adds an enabled computer object to the OU, as a join would leave it.
    pub fn create_computer(&self, name: &str) {
        self.samba_tool(&["computer", "create", name, "--computerou=OU=CloudPCs"]);
    }

    /// Runs samba-tool on the DC's own database; panics with its output when it fails.
    fn samba_tool(&self, args: &[&str]) {
        let out = Command::new("samba-tool")
            .args(args)
            .args(["-H", &format!("{STATE}/dc/private/sam.ldb"), "-s", &format!("{STATE}/dc/etc/smb.conf")])
            .output()
            .expect("samba-tool");
        assert!(
            out.status.success(),
            "samba-tool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Adds a domain user account.
    pub fn create_user(&self, name: &str, password: &str) {
        self.samba_tool(&["user", "create", name, password, "--given-name", name]);
    }

    /// Disables an account (`NAME$` for a computer), as an earlier clean-up leaves a computer.
    pub fn disable_account(&self, sam_account_name: &str) {
        self.samba_tool(&["user", "disable", sam_account_name]);
    }

    /// The computer object's userAccountControl, if it exists.
    pub fn account_control(&self, name: &str) -> Option<u32> {
        let out = Command::new("ldbsearch")
            .args([
                "-H",
                &format!("{STATE}/dc/private/sam.ldb"),
                &format!("(sAMAccountName={name}$)"),
                "userAccountControl",
            ])
            .output()
            .expect("ldbsearch");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("userAccountControl: ")?.trim().parse().ok())
    }
}

impl Drop for TestDc {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("down").output();
    }
}
