//! The host CA and the certificates of mutual TLS between the control plane and host agents.
//!
//! The control plane keeps one CA (in the database, so every replica signs alike). A joining
//! host generates its key itself and sends only a certificate request; the CA signs it for the
//! address the host registered, for server use only. Each control-plane replica issues itself a
//! client-only certificate at start. Both sides trust nothing but the CA.

use std::sync::Arc;

use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate work failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS set-up failed: {0}")]
    Tls(String),
    #[error("the certificate request is not valid: {0}")]
    BadRequest(String),
}

type Result<T, E = PkiError> = std::result::Result<T, E>;

/// A certificate valid from yesterday for `years` years (whole days: certificate times need no
/// more, and yesterday tolerates a host clock slightly behind).
fn validity(params: &mut CertificateParams, years: i32) {
    let today = chrono::Utc::now().date_naive();
    let from = today.pred_opt().unwrap_or(today);
    params.not_before = rcgen::date_time_ymd(from.year(), from.month() as u8, from.day() as u8);
    params.not_after = rcgen::date_time_ymd(from.year() + years, from.month() as u8, from.day().min(28) as u8);
}

fn name(common: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cloudpc");
    dn.push(DnType::CommonName, common);
    dn
}

/// The host CA: its certificate and key, both PEM.
#[derive(Clone)]
pub struct HostCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for HostCa {
    // The key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCa").field("key_pem", &"<secret>").finish_non_exhaustive()
    }
}

impl HostCa {
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name("cloudpc host CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 20);
        let cert = params.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    fn issuer(&self) -> Result<(rcgen::Certificate, KeyPair)> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        let cert = CertificateParams::from_ca_cert_pem(&self.cert_pem)?.self_signed(&key)?;
        Ok((cert, key))
    }

    /// Signs a host's certificate request for the address it registered (an IP address or a DNS
    /// name), for server authentication only. What the request itself asks for is ignored.
    pub fn sign_host(&self, csr_pem: &str, host_name: &str, address: &str) -> Result<String> {
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::BadRequest(format!("{e}")))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(&format!("cloudpc host {host_name}"));
        params.subject_alt_names = vec![match address.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                address
                    .to_string()
                    .try_into()
                    .map_err(|_| PkiError::BadRequest(format!("'{address}' is not a host name")))?,
            ),
        }];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 5);
        csr.params = params;
        let (issuer, key) = self.issuer()?;
        Ok(csr.signed_by(&issuer, &key)?.pem())
    }

    /// A client-only certificate for one control-plane replica: (certificate, key), PEM.
    pub fn issue_control_plane(&self, replica: &str) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(&format!("cloudpc control plane {replica}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 1);
        let (issuer, ca_key) = self.issuer()?;
        let cert = params.signed_by(&key, &issuer, &ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A new host key and a certificate request for it: (request, key), PEM.
pub fn host_request(host_name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(&format!("cloudpc host {host_name}"));
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Tls(format!("bad certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::Tls("no certificate in the PEM text".into()));
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Tls(format!("bad key PEM: {e}")))
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c).map_err(|e| PkiError::Tls(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

/// The agent's TLS: its own certificate, and only clients with a certificate from the CA (which
/// must be for client use: an agent's own certificate is refused).
pub fn server_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<rustls::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .build()
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem)?, key(key_pem)?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The control plane's TLS towards agents: trusts only the CA, presents the replica's certificate.
pub fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs(cert_pem)?, key(key_pem)?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_host_certificates_are_for_servers_and_replica_certificates_for_clients() {
        let ca = HostCa::generate().unwrap();
        let (csr, host_key) = host_request("hv1").unwrap();
        let host_cert = ca.sign_host(&csr, "hv1", "127.0.0.1").unwrap();
        let (cp_cert, cp_key) = ca.issue_control_plane("r1").unwrap();
        server_config(&ca.cert_pem, &host_cert, &host_key).unwrap();
        client_config(&ca.cert_pem, &cp_cert, &cp_key).unwrap();
        let host = x509(&host_cert);
        assert!(host.contains("TLS Web Server Authentication") && !host.contains("Client Authentication"), "{host}");
        assert!(host.contains("IP Address:127.0.0.1"), "{host}");
        let cp = x509(&cp_cert);
        assert!(cp.contains("TLS Web Client Authentication") && !cp.contains("Server Authentication"), "{cp}");
        assert!(ca.sign_host("not a request", "hv1", "127.0.0.1").is_err());
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    fn x509(pem: &str) -> String {
        let mut child = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(pem.as_bytes()).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    }
}
