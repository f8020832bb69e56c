//! Mutual TLS for the control plane's QUIC endpoints: a cluster CA signs every node's and
//! client's certificate; each side checks the other's chain against the CA.
//!
//! `controlplane certs` writes a CA and certificates with [`generate`]; every certificate
//! carries the DNS name [`SERVER_NAME`], which clients ask for, so any node's certificate
//! serves any address.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The name every certificate carries and every client verifies.
pub const SERVER_NAME: &str = "meridian-control";
/// ALPN of the control protocol.
pub const ALPN: &[u8] = b"meridian-control/1";

/// Writes, for each name, `<name>.pem` and `<name>.key` into `dir`, signed by the cluster CA
/// there (`ca.pem`, `ca.key`); creates the CA first when `dir` has none. The CA key is kept
/// so that more certificates (new nodes, data nodes, clients) can be issued later.
pub fn generate(dir: &Path, names: &[String]) -> Result<()> {
    if let Some(bad) = names.iter().find(|name| name.is_empty() || name.contains(['/', '.']) || name.as_str() == "ca") {
        bail!("certificate name {bad:?} must be non-empty, not \"ca\", and contain no '/' or '.'");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key_path = dir.join("ca.key");
    let existing_ca = ca_key_path.exists();
    let ca_key = if existing_ca {
        let pem =
            std::fs::read_to_string(&ca_key_path).with_context(|| format!("reading {}", ca_key_path.display()))?;
        KeyPair::from_pem(&pem).with_context(|| format!("parsing {}", ca_key_path.display()))?
    } else {
        KeyPair::generate()?
    };
    // The same parameters as the CA certificate: its subject and key identify the issuer, so
    // certificates signed later chain to the `ca.pem` written first.
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "Meridian cluster CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if !existing_ca {
        let ca_cert = ca_params.self_signed(&ca_key)?;
        write(dir, "ca.pem", &ca_cert.pem())?;
        write(dir, "ca.key", &ca_key.serialize_pem())?;
    }
    let issuer = Issuer::new(ca_params, ca_key);
    for name in names {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned(), "localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name.as_str());
        let cert = params.signed_by(&key, &issuer)?;
        write(dir, &format!("{name}.pem"), &cert.pem())?;
        write(dir, &format!("{name}.key"), &key.serialize_pem())?;
    }
    Ok(())
}

fn write(dir: &Path, file: &str, contents: &str) -> Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
}

/// Where one party's TLS files are: the CA certificate and its own certificate and key.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This party's certificate chain (PEM).
    pub cert: PathBuf,
    /// This party's private key (PEM).
    pub key: PathBuf,
}

impl Identity {
    /// `dir/ca.pem`, `dir/<name>.pem`, `dir/<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
    }

    /// Checks the three files exist; the error names the missing one, the config field
    /// (`field`) that points at `dir`, and how to create it.
    pub fn require_files(&self, field: &str, dir: &Path, name: &str) -> Result<(), String> {
        match [&self.ca, &self.cert, &self.key].into_iter().find(|path| !path.exists()) {
            Some(path) => Err(format!(
                "{field}: {} is missing (create it with `controlplane certs --out {} {name}`)",
                path.display(),
                dir.display()
            )),
            None => Ok(()),
        }
    }

    fn load(&self) -> Result<(rustls::RootCertStore, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).with_context(|| format!("reading {}", self.ca.display()))? {
            roots.add(cert.with_context(|| format!("parsing {}", self.ca.display()))?)?;
        }
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .with_context(|| format!("reading {}", self.cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", self.cert.display()))?;
        if chain.is_empty() {
            bail!("{} holds no certificate", self.cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).with_context(|| format!("reading {}", self.key.display()))?;
        Ok((roots, chain, key))
    }

    /// The QUIC server side: presents our certificate, requires a CA-signed client one.
    pub fn server_config(&self) -> Result<quinn::ServerConfig> {
        self.server_config_for(ALPN, transport())
    }

    /// The QUIC client side: verifies the server against the CA and presents our certificate.
    pub fn client_config(&self) -> Result<quinn::ClientConfig> {
        self.client_config_for(ALPN, transport())
    }

    /// [`Identity::server_config`] for another protocol (`alpn`) and transport settings.
    pub fn server_config_for(&self, alpn: &[u8], transport: quinn::TransportConfig) -> Result<quinn::ServerConfig> {
        let (roots, chain, key) = self.load()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .context("building the client certificate verifier")?;
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .context("loading the server certificate")?;
        crypto.alpn_protocols = vec![alpn.to_vec()];
        let crypto = QuicServerConfig::try_from(crypto).context("TLS config unusable for QUIC")?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    /// [`Identity::client_config`] for another protocol (`alpn`) and transport settings.
    pub fn client_config_for(&self, alpn: &[u8], transport: quinn::TransportConfig) -> Result<quinn::ClientConfig> {
        let (roots, chain, key) = self.load()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("loading the client certificate")?;
        crypto.alpn_protocols = vec![alpn.to_vec()];
        let crypto = QuicClientConfig::try_from(crypto).context("TLS config unusable for QUIC")?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

fn transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // Peers ping each other every heartbeat anyway; idle connections close after 10 s so a
    // dead peer's connection does not linger, and keep-alives hold live ones open.
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(10_000).into()));
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    transport
}
