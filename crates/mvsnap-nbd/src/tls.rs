//! TLS for NBD over TCP: x509 server credentials from PEM files, and optionally client
//! certificates checked against a CA as access control (only clients holding a certificate
//! that CA signed get past the handshake).
//!
//! The server side of `NBD_OPT_STARTTLS` is in `handshake.rs` and `server.rs`; this module
//! only builds the [`TlsConfig`] that [`crate::NbdServer::serve_tcp_tls`] takes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Where the credentials are: PEM files, as qemu-nbd and nbdkit take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate, followed by any intermediate certificates.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// If set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS credentials could not be loaded. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no PEM certificate (\"BEGIN CERTIFICATE\") in it", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)", .0.display())]
    NoKey(PathBuf),
    #[error("{}: bad PEM: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("{}: CA certificate refused: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("client CA {}: {source}", path.display())]
    ClientVerifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("server certificate {} with key {}: {source}", cert.display(), key.display())]
    Credentials {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// A loaded server-side TLS configuration; cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) acceptor: TlsAcceptor,
    client_auth: bool,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Load and check the credentials (the key must match the certificate). TLS 1.2 and 1.3
    /// only, as the NBD spec asks; the `ring` provider.
    pub fn load(files: &TlsFiles) -> Result<TlsConfig, TlsError> {
        let certs = read_certs(&files.cert)?;
        let key_pem = read(&files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey(files.key.clone()),
            e => TlsError::Pem {
                path: files.key.clone(),
                message: e.to_string(),
            },
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let credentials = |source| TlsError::Credentials {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(credentials)?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for ca in read_certs(path)? {
                    roots.add(ca).map_err(|source| TlsError::BadCa {
                        path: path.clone(),
                        source,
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|source| TlsError::ClientVerifier {
                            path: path.clone(),
                            source,
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        // with_single_cert also checks that the key is the certificate's.
        let config = builder.with_single_cert(certs, key).map_err(credentials)?;
        Ok(TlsConfig {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            client_auth: files.client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate.
    pub fn client_auth(&self) -> bool {
        self.client_auth
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}
