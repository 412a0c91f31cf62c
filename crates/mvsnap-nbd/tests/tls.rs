//! TLS at the protocol level (FORCEDTLS, spec "TLS support"), with a hand-driven client over
//! TCP: every option before `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_TLS_REQD`, EXPORT_NAME
//! before it closes, STARTTLS is acknowledged once and refused once TLS runs, and the whole
//! session then goes over TLS (rustls's client, with throwaway certificates from rcgen).
//! Client certificates as access control: none, or one from another CA, is refused.
//! Real clients (nbdinfo, nbdcopy, qemu-io) are in mvsnap-daemon's tests/tls.rs.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{pattern_bytes, sha256, RawClient, MIB};
use mvsnap_nbd::memory::{MemExport, MemRegistry};
use mvsnap_nbd::proto::{self, *};
use mvsnap_nbd::{NbdServer, TlsConfig, TlsError, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.as_ref().pem()
    }

    /// (certificate PEM, key PEM) of a leaf: a server for localhost/127.0.0.1, or a client.
    fn leaf(&self, name: &str, server: bool) -> (String, String) {
        let sans = if server {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        } else {
            vec![]
        };
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

// ---------------------------------------------------------------------------------------------
// A server that requires TLS on loopback TCP
// ---------------------------------------------------------------------------------------------

struct TlsServer {
    rt: tokio::runtime::Runtime,
    server: NbdServer,
    addr: SocketAddr,
    export: Arc<MemExport>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TlsServer {
    fn start(tls: TlsConfig) -> TlsServer {
        common::init_tracing();
        let mut reg = MemRegistry::new();
        let export = reg.add("disk", "a test disk", MemExport::new(4 * MIB));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = NbdServer::new(Arc::new(reg));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let s = server.clone();
        let task = rt.spawn(async move { s.serve_tcp_tls(listener, tls).await });
        TlsServer {
            rt,
            server,
            addr,
            export,
            task: Some(task),
        }
    }

    fn connect(&self) -> RawClient<TcpStream> {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        RawClient { s }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let server = self.server.clone();
        let task = self.task.take().unwrap();
        let r = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(60), async move {
                server.shutdown().await;
                task.await.expect("serve task panicked")
            })
            .await
        });
        if !std::thread::panicking() {
            r.expect("shutdown timed out")
                .expect("serve_tcp_tls failed");
        }
    }
}

/// A rustls client trusting `ca`, with an optional client certificate.
fn client_config(ca: &str, cert: Option<&(String, String)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match cert {
        None => b.with_no_client_auth(),
        Some((c, k)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap(),
            )
            .unwrap(),
    })
}

type TlsClient = RawClient<StreamOwned<ClientConnection, TcpStream>>;

/// After STARTTLS's ACK: run the TLS handshake over the same socket (the server's
/// certificate is checked against `cfg`'s roots for the IP address 127.0.0.1).
fn upgrade(c: RawClient<TcpStream>, cfg: Arc<ClientConfig>) -> std::io::Result<TlsClient> {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = ClientConnection::new(cfg, name).unwrap();
    let mut tcp = c.s;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(RawClient {
        s: StreamOwned::new(conn, tcp),
    })
}

/// Greet, STARTTLS (acknowledged), and the TLS handshake.
fn starttls(t: &TlsServer, cfg: Arc<ClientConfig>) -> std::io::Result<TlsClient> {
    let mut c = t.connect();
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert_eq!(c.option(OPT_STARTTLS, &[]), vec![(REP_ACK, vec![])]);
    upgrade(c, cfg)
}

/// The server refused this client's TLS session: the handshake failed, or (TLS 1.3, where
/// the client's certificate is checked after the client finished) the first option after it
/// gets no reply but an alert or EOF.
fn assert_refused(r: std::io::Result<TlsClient>) {
    let mut c = match r {
        Err(e) => {
            eprintln!("refused in the handshake: {e}");
            return;
        }
        Ok(c) => c,
    };
    let b = proto::encode_option_header(OPT_LIST, 0);
    let _ = c.s.write_all(&b).and_then(|_| c.s.flush());
    let mut buf = [0u8; 1];
    match c.s.read(&mut buf) {
        Ok(0) => eprintln!("refused: EOF after the handshake"),
        Err(e) => eprintln!("refused after the handshake: {e}"),
        Ok(_) => panic!("the server answered a client it should have refused"),
    }
}

fn server_files(ca: &Ca, dir: &tempfile::TempDir, client_ca: Option<&Ca>) -> TlsFiles {
    let (cert, key) = ca.leaf("localhost", true);
    TlsFiles {
        cert: write(dir, "server-cert.pem", &cert),
        key: write(dir, "server-key.pem", &key),
        client_ca: client_ca.map(|c| write(dir, "client-ca.pem", &c.pem())),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn options_before_starttls_get_tls_reqd_then_everything_runs_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let tls = TlsConfig::load(&server_files(&ca, &dir, None)).unwrap();
    assert!(!tls.client_auth());
    let t = TlsServer::start(tls);
    let data = pattern_bytes(7, 256 * 1024);
    t.export.fill(MIB, &data);

    let mut c = t.connect();
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let info = encode_info_request(&InfoRequest {
        name: "disk".into(),
        requests: vec![],
    });
    let meta = encode_meta_context_request(&MetaContextRequest {
        export: "disk".into(),
        queries: vec!["base:allocation".into()],
    });
    // Every option but STARTTLS and ABORT: one reply, TLS_REQD, and no information leaks
    // (no export names, no sizes).
    for (opt, data) in [
        (OPT_LIST, vec![]),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_INFO, info.clone()),
        (OPT_GO, info.clone()),
        (OPT_LIST_META_CONTEXT, meta.clone()),
        (OPT_SET_META_CONTEXT, meta.clone()),
        (0x4242, b"an option nobody knows".to_vec()),
        (OPT_LIST, b"malformed".to_vec()),
    ] {
        let r = c.option(opt, &data);
        assert_eq!(r.len(), 1, "option {opt}: {r:?}");
        assert_eq!(r[0].0, REP_ERR_TLS_REQD, "option {opt}: {r:?}");
        let msg = String::from_utf8(r[0].1.clone()).unwrap();
        assert!(msg.contains("TLS is required"), "option {opt}: {msg}");
    }
    // An oversize option too (skipped unread, as any other).
    let big = vec![0u8; proto::MAX_OPTION_LEN as usize + 1];
    assert_eq!(c.option(OPT_LIST, &big)[0].0, REP_ERR_TLS_REQD);
    // STARTTLS with data is malformed: INVALID, still plaintext.
    assert_eq!(c.option(OPT_STARTTLS, b"x")[0].0, REP_ERR_INVALID);

    // Upgrade; from here on the same options work, and a second STARTTLS is INVALID.
    assert_eq!(c.option(OPT_STARTTLS, &[]), vec![(REP_ACK, vec![])]);
    let mut c = upgrade(c, client_config(&ca.pem(), None)).expect("TLS handshake");
    let r = c.option(OPT_STARTTLS, &[]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, REP_ERR_INVALID, "{r:?}");
    let r = c.option(OPT_LIST, &[]);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].0, REP_SERVER);
    assert_eq!(&r[0].1[4..8], b"disk");
    assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[]), vec![(REP_ACK, vec![])]);
    let (size, flags) = c.go("disk").expect("GO over TLS");
    assert_eq!(size, 4 * MIB);
    assert_eq!(flags & FLAG_READ_ONLY, 0);

    // Transmission over TLS: read what the export holds, write and read back.
    c.request(CMD_READ, 0, 1, MIB, data.len() as u32);
    let mut got = Vec::new();
    loop {
        let ch = c.chunk();
        assert_eq!(ch.handle, 1);
        if ch.reply_type == REPLY_TYPE_OFFSET_DATA {
            let off = u64::from_be_bytes(ch.payload[..8].try_into().unwrap());
            assert_eq!(off, MIB + got.len() as u64, "chunks in order");
            got.extend_from_slice(&ch.payload[8..]);
        } else {
            assert_eq!(ch.reply_type, REPLY_TYPE_NONE, "{ch:?}");
        }
        if ch.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(sha256(&got), sha256(&data), "read over TLS");
    let new = pattern_bytes(8, 128 * 1024);
    c.write_req(2, 3 * MIB, &new);
    let ch = c.chunk();
    assert_eq!((ch.handle, ch.reply_type), (2, REPLY_TYPE_NONE), "{ch:?}");
    c.request(CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(c.chunk().handle, 3);
    c.disconnect();
    let contents = t.export.contents();
    let at = |o: u64, n: usize| sha256(&contents[o as usize..o as usize + n]);
    assert_eq!(at(3 * MIB, new.len()), sha256(&new), "write over TLS");
    assert_eq!(at(MIB, data.len()), sha256(&data));
}

#[test]
fn export_name_or_old_clients_before_starttls_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let t = TlsServer::start(TlsConfig::load(&server_files(&ca, &dir, None)).unwrap());
    t.export.fill(0, &[0x77; 4096]);

    // EXPORT_NAME cannot be answered with an error: the server closes, sending nothing.
    let mut c = t.connect();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.send_option(OPT_EXPORT_NAME, b"disk");
    assert!(c.is_closed(), "EXPORT_NAME before TLS must close");

    // A client without fixed newstyle cannot do TLS at all.
    let mut c = t.connect();
    c.greet(0);
    assert!(
        c.is_closed(),
        "no FIXED_NEWSTYLE with TLS required must close"
    );

    // ABORT is allowed before TLS.
    let mut c = t.connect();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(c.option(OPT_ABORT, &[]), vec![(REP_ACK, vec![])]);
    assert!(c.is_closed());

    // A client that sends its TLS hello with the STARTTLS (not waiting for the ACK) is cut off:
    // bytes read before the handshake would be plaintext smuggled into the session.
    let mut c = t.connect();
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    let mut b = proto::encode_option_header(OPT_STARTTLS, 0).to_vec();
    b.extend_from_slice(b"\x16\x03\x01 not a real hello");
    c.send(&b);
    assert_eq!(c.read_option_reply(OPT_STARTTLS), (REP_ACK, vec![]));
    assert!(c.is_closed());

    // And the server still serves a proper client afterwards.
    let mut c = starttls(&t, client_config(&ca.pem(), None)).unwrap();
    c.go("disk").unwrap();
    c.request(CMD_READ, 0, 9, 0, 4096);
    assert_eq!(c.simple(), (9, 0));
    assert_eq!(c.recv(4096), vec![0x77; 4096]);
    c.disconnect();
}

#[test]
fn a_client_that_does_not_trust_the_server_cannot_connect() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let other = Ca::new("another CA");
    let t = TlsServer::start(TlsConfig::load(&server_files(&ca, &dir, None)).unwrap());
    let e = starttls(&t, client_config(&other.pem(), None))
        .err()
        .expect("a client trusting another CA must fail the handshake");
    assert!(e.to_string().contains("certificate"), "{e}");
}

#[test]
fn client_certificates_are_access_control() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let clients = Ca::new("clients CA");
    let other = Ca::new("another CA");
    let tls = TlsConfig::load(&server_files(&ca, &dir, Some(&clients))).unwrap();
    assert!(tls.client_auth());
    let t = TlsServer::start(tls);
    t.export.fill(0, &[0x3c; 4096]);

    // No certificate; one signed by another CA; one signed by the server's own CA (trusted
    // for the server, not for clients): all refused.
    assert_refused(starttls(&t, client_config(&ca.pem(), None)));
    let wrong = other.leaf("mallory", false);
    assert_refused(starttls(&t, client_config(&ca.pem(), Some(&wrong))));
    let wrong = ca.leaf("eve", false);
    assert_refused(starttls(&t, client_config(&ca.pem(), Some(&wrong))));

    // Signed by the clients' CA: served.
    let good = clients.leaf("alice", false);
    let mut c = starttls(&t, client_config(&ca.pem(), Some(&good))).expect("allowed client");
    c.go("disk").unwrap();
    c.request(CMD_READ, 0, 5, 0, 4096);
    assert_eq!(c.simple(), (5, 0));
    assert_eq!(c.recv(4096), vec![0x3c; 4096]);
    c.disconnect();
}

#[test]
fn bad_credentials_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = ca.leaf("localhost", true);
    let (_, other_key) = ca.leaf("localhost", true);
    let cert_p = write(&dir, "cert.pem", &cert);
    let key_p = write(&dir, "key.pem", &key);
    let files = |cert: &PathBuf, key: &PathBuf, ca: Option<&PathBuf>| TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: ca.cloned(),
    };
    let err = |f: TlsFiles| TlsConfig::load(&f).expect_err("must fail");

    let missing = dir.path().join("missing.pem");
    let e = err(files(&missing, &key_p, None));
    assert!(matches!(e, TlsError::Read { .. }), "{e:?}");
    assert!(e.to_string().contains("missing.pem"), "{e}");

    // A key where the certificate should be, and the other way round.
    let e = err(files(&key_p, &key_p, None));
    assert!(matches!(e, TlsError::NoCertificate(_)), "{e:?}");
    assert!(e.to_string().contains("key.pem"), "{e}");
    let e = err(files(&cert_p, &cert_p, None));
    assert!(matches!(e, TlsError::NoKey(_)), "{e:?}");
    assert!(e.to_string().contains("cert.pem"), "{e}");

    // A key that is not the certificate's.
    let wrong_key = write(&dir, "other-key.pem", &other_key);
    let e = err(files(&cert_p, &wrong_key, None));
    assert!(matches!(e, TlsError::Credentials { .. }), "{e:?}");

    // A client CA file without a certificate.
    let empty = write(&dir, "empty.pem", "nothing here\n");
    let e = err(files(&cert_p, &key_p, Some(&empty)));
    assert!(matches!(e, TlsError::NoCertificate(_)), "{e:?}");
    assert!(e.to_string().contains("empty.pem"), "{e}");

    assert!(TlsConfig::load(&files(&cert_p, &key_p, None)).is_ok());
}
