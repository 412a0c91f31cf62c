//! NBD over TCP with TLS, against real clients: libnbd's `nbds://` (nbdinfo, nbdcopy, which
//! use gnutls) and qemu-io with `--object tls-creds-x509`. Certificates are made the way the
//! README shows, with `openssl`, in the layout libnbd and qemu read from a directory
//! (ca-cert.pem, client-cert.pem, client-key.pem).
//!
//! Checked: reads and writes over TLS match by SHA-256 (and qemu-io `read -P`); a client
//! without TLS, or not trusting the CA, is refused; with `--tls-client-ca`, clients without a
//! certificate or with one from another CA are refused and the right one works; the Unix
//! socket stays plaintext and 0600; `--listen` off loopback without TLS is refused (exit 2)
//! unless `--insecure`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const SIZE: u64 = 4 * MIB;

// ---------------------------------------------------------------------------------------------
// Certificates, with openssl as the README does it
// ---------------------------------------------------------------------------------------------

fn openssl(bin: &Path, dir: &Path, args: &[&str]) {
    run_ok(Command::new(bin).current_dir(dir).args(args));
}

/// `openssl req -x509` of a new P-256 key, run in `dir`: `key` and `cert` (paths, relative to
/// `dir` or absolute), valid two days, subject `/CN=CN`, then `extra` arguments (extensions,
/// the signing CA; none: self-signed, a CA).
fn new_cert(bin: &Path, dir: &Path, key: &str, cert: &str, cn: &str, extra: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    let subject = format!("/CN={cn}");
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        cert,
        "-days",
        "2",
        "-subj",
        &subject,
    ];
    args.extend_from_slice(extra);
    openssl(bin, dir, &args);
}

/// A new CA in `dir`: ca-cert.pem, ca-key.pem.
fn make_ca(bin: &Path, dir: &Path, name: &str) {
    new_cert(bin, dir, "ca-key.pem", "ca-cert.pem", name, &[]);
}

/// `{what}-cert.pem` and `{what}-key.pem` in `out`, signed by the CA in `ca`; `what` is
/// "server" (for localhost and 127.0.0.1) or "client".
fn make_leaf(bin: &Path, ca: &Path, out: &Path, what: &str) {
    let (san, eku) = if what == "server" {
        (
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "extendedKeyUsage=serverAuth",
        )
    } else {
        (
            "subjectAltName=DNS:client.test",
            "extendedKeyUsage=clientAuth",
        )
    };
    let key = out.join(format!("{what}-key.pem"));
    let cert = out.join(format!("{what}-cert.pem"));
    let ca_cert = ca.join("ca-cert.pem");
    let ca_key = ca.join("ca-key.pem");
    new_cert(
        bin,
        out,
        key.to_str().unwrap(),
        cert.to_str().unwrap(),
        &format!("test {what}"),
        &[
            "-addext",
            san,
            "-addext",
            eku,
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-CA",
            ca_cert.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
        ],
    );
}

/// A client directory in the libnbd/qemu layout: `trusts` are the CAs in its ca-cert.pem,
/// `cert_by` the CA that signs its own certificate (none: no client certificate). qemu checks
/// its own certificate against ca-cert.pem too, so that CA must be among `trusts` for qemu.
fn client_dir(bin: &Path, dir: &Path, trusts: &[&Path], cert_by: Option<&Path>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let bundle: Vec<u8> = trusts
        .iter()
        .flat_map(|ca| std::fs::read(ca.join("ca-cert.pem")).unwrap())
        .collect();
    std::fs::write(dir.join("ca-cert.pem"), bundle).unwrap();
    if let Some(signer) = cert_by {
        make_leaf(bin, signer, dir, "client");
    }
    dir.to_path_buf()
}

/// The PKI of one test, as qemu lays it out: one CA signs the server's and the clients'
/// certificates (and is the server's --tls-client-ca); another CA the server does not trust.
struct Pki {
    ca: PathBuf,
    rogue_ca: PathBuf,
    server: PathBuf,
}

impl Pki {
    fn new(bin: &Path, root: &Path) -> Pki {
        let p = Pki {
            ca: root.join("ca"),
            rogue_ca: root.join("rogue-ca"),
            server: root.join("server"),
        };
        make_ca(bin, &p.ca, "mvsnap test CA");
        make_ca(bin, &p.rogue_ca, "rogue CA");
        make_leaf(bin, &p.ca, &p.server, "server");
        p
    }

    /// `serve` arguments for TLS, with a client CA or not.
    fn serve_args(&self, client_ca: bool) -> Vec<String> {
        let mut v = vec![
            "--tls-cert".to_string(),
            path(&self.server.join("server-cert.pem")),
            "--tls-key".to_string(),
            path(&self.server.join("server-key.pem")),
        ];
        if client_ca {
            v.push("--tls-client-ca".into());
            v.push(path(&self.ca.join("ca-cert.pem")));
        }
        v
    }
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// Daemon and clients
// ---------------------------------------------------------------------------------------------

/// Start the daemon with `--listen ADDR:0` and these arguments; returns it and the port.
fn start(fx: &Fixture, listen: &str, args: &[String]) -> (Daemon, u16) {
    let mut all: Vec<&str> = vec!["--listen", listen];
    all.extend(args.iter().map(String::as_str));
    let d = fx
        .try_start_with(&all, &[])
        .unwrap_or_else(|e| panic!("the daemon did not start: {e}"));
    let tcp = d
        .ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tcp="))
        .unwrap_or_else(|| panic!("no tcp= in {:?}", d.ready));
    let port = tcp.rsplit_once(':').unwrap().1.parse().unwrap();
    (d, port)
}

fn nbds(port: u16, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/disk0?tls-certificates={}",
        dir.display()
    )
}

/// nbdinfo --size; Ok(size) or Err(its output, with libnbd's debug messages).
fn nbdinfo_size(nbdinfo: &Path, uri: &str) -> Result<u64, String> {
    let out = run(
        Command::new(nbdinfo)
            .env("LIBNBD_DEBUG", "1")
            .arg("--size")
            .arg(uri),
        TOOL_TIMEOUT,
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
    } else {
        Err(text(&out))
    }
}

/// qemu-io over TLS with a tls-creds-x509 object reading `dir` (None: no TLS at all).
fn qemu_io_tls(qemu_io: &Path, port: u16, dir: Option<&Path>, cmds: &[String]) -> Output {
    let mut c = Command::new(qemu_io);
    let mut opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk0"
    );
    if let Some(dir) = dir {
        c.arg("--object").arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        ));
        opts.push_str(",tls-creds=tls0");
    }
    c.arg("--image-opts").arg(opts);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    run(&mut c, TOOL_TIMEOUT)
}

#[track_caller]
fn assert_qemu_io_ok(out: &Output) -> String {
    let t = text(out);
    assert!(
        out.status.success() && !t.contains("failed") && !t.contains("rror"),
        "qemu-io over TLS: {}\n{t}",
        out.status
    );
    t
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn libnbd_reads_and_writes_over_tls_on_a_network_address() {
    let [openssl_bin, nbdinfo, nbdcopy] = need!("openssl", "nbdinfo", "nbdcopy");
    let initial = pattern_bytes(1, SIZE as usize);
    let fx = Fixture::new("tls-libnbd", SIZE, &initial);
    let pki = Pki::new(&openssl_bin, &fx.dir.join("pki"));
    let good = client_dir(&openssl_bin, &fx.dir.join("c-good"), &[&pki.ca], None);
    // Every address (0.0.0.0) is allowed with TLS; clients come in on 127.0.0.1.
    let (d, port) = start(&fx, "0.0.0.0:0", &pki.serve_args(false));
    assert!(d.ready.contains(" tls=on"), "{}", d.ready);
    assert!(d.ready.contains("tcp=0.0.0.0:"), "{}", d.ready);

    assert_eq!(nbdinfo_size(&nbdinfo, &nbds(port, &good)), Ok(SIZE));
    let out = run(Command::new(&nbdinfo).arg(nbds(port, &good)), TOOL_TIMEOUT);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("with TLS"),
        "nbdinfo says TLS was negotiated: {}",
        text(&out)
    );

    // Read the whole export over TLS.
    let out = run(
        Command::new(&nbdcopy).arg(nbds(port, &good)).arg("-"),
        TOOL_TIMEOUT,
    );
    assert!(out.status.success(), "nbdcopy read: {}", text(&out));
    assert_eq!(sha256(&out.stdout), sha256(&initial), "read over TLS");

    // Write a whole new image over TLS, from a file.
    let new = pattern_bytes(2, SIZE as usize);
    let src = fx.dir.join("new.img");
    std::fs::write(&src, &new).unwrap();
    run_ok(Command::new(&nbdcopy).arg(&src).arg(nbds(port, &good)));
    // Read back over TLS, and over the Unix socket (plaintext, no TLS needed there).
    let out = run(
        Command::new(&nbdcopy).arg(nbds(port, &good)).arg("-"),
        TOOL_TIMEOUT,
    );
    assert!(out.status.success(), "nbdcopy read back: {}", text(&out));
    assert_eq!(sha256(&out.stdout), sha256(&new), "read back over TLS");
    assert_eq!(sha256(&fx.nbdcopy_read(&nbdcopy, "disk0")), sha256(&new));
    let mode = std::fs::metadata(&fx.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the Unix socket stays 0600");
    assert_eq!(d.terminate().code(), Some(0));
    fx.assert_check_clean("after TLS writes");
}

#[test]
fn qemu_io_reads_and_writes_over_tls() {
    let [openssl_bin, qemu_io, nbdcopy] = need!("openssl", "qemu-io", "nbdcopy");
    let mut model = vec![0u8; SIZE as usize];
    model[..MIB as usize].copy_from_slice(&pattern_bytes(3, MIB as usize));
    let fx = Fixture::new("tls-qemu", SIZE, &model[..MIB as usize]);
    let pki = Pki::new(&openssl_bin, &fx.dir.join("pki"));
    let good = client_dir(&openssl_bin, &fx.dir.join("c-good"), &[&pki.ca], None);
    let (d, port) = start(&fx, "127.0.0.1:0", &pki.serve_args(false));

    let writes = [
        (4096u64, 65536u64, 0x5au8),
        (MIB + 123, 5000, 0xc3),
        (SIZE - 8192, 8192, 0x01),
    ];
    let mut cmds = Vec::new();
    for &(off, len, b) in &writes {
        fill(&mut model, off, len, b);
        cmds.push(format!("write -P {b:#04x} {off} {len}"));
    }
    for &(off, len, b) in &writes {
        cmds.push(format!("read -P {b:#04x} {off} {len}"));
    }
    let t = assert_qemu_io_ok(&qemu_io_tls(&qemu_io, port, Some(&good), &cmds));
    assert_eq!(t.matches("wrote ").count(), writes.len(), "{t}");
    assert_eq!(t.matches("read ").count(), writes.len(), "{t}");
    // Over the Unix socket, the whole image against the model.
    let got = fx.nbdcopy_read(&nbdcopy, "disk0");
    assert_image("after qemu-io over TLS", &got, &model);
    // And qemu-io reading a byte it did not write, with the pattern from the model.
    let b = model[(MIB / 2) as usize];
    let cmd = vec![format!("read -P {b:#04x} {} 1", MIB / 2)];
    assert_qemu_io_ok(&qemu_io_tls(&qemu_io, port, Some(&good), &cmd));
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn clients_without_tls_or_not_trusting_the_ca_are_refused() {
    let [openssl_bin, nbdinfo, qemu_io] = need!("openssl", "nbdinfo", "qemu-io");
    let fx = Fixture::new("tls-refuse", SIZE, &[0x11; 4096]);
    let pki = Pki::new(&openssl_bin, &fx.dir.join("pki"));
    let good = client_dir(&openssl_bin, &fx.dir.join("c-good"), &[&pki.ca], None);
    let untrusting = client_dir(
        &openssl_bin,
        &fx.dir.join("c-rogue"),
        &[&pki.rogue_ca],
        None,
    );
    let (mut d, port) = start(&fx, "127.0.0.1:0", &pki.serve_args(false));

    // Plain NBD on the TLS port: the server answers TLS_REQD (libnbd logs its message).
    let e = nbdinfo_size(&nbdinfo, &format!("nbd://127.0.0.1:{port}/disk0"))
        .expect_err("a plaintext client must be refused");
    assert!(e.contains("TLS is required"), "{e}");
    let out = qemu_io_tls(&qemu_io, port, None, &["read 0 512".to_string()]);
    assert!(!out.status.success(), "qemu-io without TLS: {}", text(&out));
    assert!(text(&out).contains("TLS is required"), "{}", text(&out));

    // TLS with a CA that did not sign the server's certificate.
    let e = nbdinfo_size(&nbdinfo, &nbds(port, &untrusting))
        .expect_err("a client not trusting the CA must fail");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    let out = qemu_io_tls(
        &qemu_io,
        port,
        Some(&untrusting),
        &["read 0 512".to_string()],
    );
    assert!(!out.status.success(), "qemu-io, untrusted: {}", text(&out));
    assert!(
        text(&out).to_lowercase().contains("certificate"),
        "{}",
        text(&out)
    );

    // The daemon is unharmed and serves a proper client.
    assert!(d.alive());
    assert_eq!(nbdinfo_size(&nbdinfo, &nbds(port, &good)), Ok(SIZE));
    let out = qemu_io_tls(&qemu_io, port, Some(&good), &["read -P 0x11 0 4096".into()]);
    assert_qemu_io_ok(&out);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn client_certificates_from_another_ca_are_refused() {
    let [openssl_bin, nbdinfo, nbdcopy, qemu_io] =
        need!("openssl", "nbdinfo", "nbdcopy", "qemu-io");
    let initial = pattern_bytes(4, SIZE as usize);
    let fx = Fixture::new("tls-clientca", SIZE, &initial);
    let pki = Pki::new(&openssl_bin, &fx.dir.join("pki"));
    let (ca, rogue_ca) = (pki.ca.as_path(), pki.rogue_ca.as_path());
    let none = client_dir(&openssl_bin, &fx.dir.join("c-none"), &[ca], None);
    // Trusts both CAs (so qemu accepts its own certificate), signed by the rogue one.
    let rogue = client_dir(
        &openssl_bin,
        &fx.dir.join("c-rogue"),
        &[ca, rogue_ca],
        Some(rogue_ca),
    );
    let good = client_dir(&openssl_bin, &fx.dir.join("c-good"), &[ca], Some(ca));
    let (mut d, port) = start(&fx, "127.0.0.1:0", &pki.serve_args(true));

    for (what, dir) in [
        ("no client certificate", &none),
        ("a certificate from another CA", &rogue),
    ] {
        let e = nbdinfo_size(&nbdinfo, &nbds(port, dir));
        assert!(e.is_err(), "nbdinfo with {what} must be refused");
        let out = qemu_io_tls(&qemu_io, port, Some(dir), &["read 0 512".into()]);
        let t = text(&out);
        assert!(!out.status.success(), "qemu-io with {what}: {t}");
        // Refused by the server (an alert, or the connection closed under qemu while it was
        // still writing: seen once in CI as "Broken pipe"), not by qemu's own checks before
        // connecting.
        assert!(
            (t.contains("TLS") || t.contains("Broken pipe") || t.contains("Connection reset"))
                && !t.contains("Our own certificate"),
            "{t}"
        );
    }
    assert!(d.alive());
    let log = d.log_text();
    assert!(
        log.contains("TLS handshake failed"),
        "refusals are logged: {log}"
    );

    // The right certificate: full read by nbdcopy, and a qemu-io write read back.
    let out = run(
        Command::new(&nbdcopy).arg(nbds(port, &good)).arg("-"),
        TOOL_TIMEOUT,
    );
    assert!(out.status.success(), "nbdcopy: {}", text(&out));
    assert_eq!(sha256(&out.stdout), sha256(&initial));
    let cmds = vec![
        "write -P 0x9e 65536 4096".to_string(),
        "read -P 0x9e 65536 4096".to_string(),
    ];
    assert_qemu_io_ok(&qemu_io_tls(&qemu_io, port, Some(&good), &cmds));
    let mut model = initial.clone();
    fill(&mut model, 65536, 4096, 0x9e);
    assert_image(
        "after a write by an allowed client",
        &fx.nbdcopy_read(&nbdcopy, "disk0"),
        &model,
    );
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn listen_off_loopback_needs_tls_or_insecure() {
    let fx = Fixture::new("tls-listen", SIZE, &[]);
    let serve = |args: &[&str]| {
        fx.ms(&[&["serve", "--nbd-socket", path(&fx.sock).as_str()], args].concat())
    };

    // Refused before anything starts: a usage error, exit 2, saying what to do.
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let out = serve(&["--listen", listen]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "--listen {listen}: {t}");
        assert!(t.contains("not a loopback address"), "{t}");
        assert!(t.contains("--tls-cert") && t.contains("--insecure"), "{t}");
        assert!(!t.contains("ready "), "{t}");
        assert!(!fx.sock.exists(), "nothing was served");
    }
    // TLS flags need each other and --listen (clap: exit 2).
    let out = serve(&["--tls-cert", "x.pem", "--tls-key", "y.pem"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = serve(&["--listen", "127.0.0.1:0", "--tls-cert", "x.pem"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = serve(&["--listen", "127.0.0.1:0", "--tls-client-ca", "x.pem"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // Credentials that cannot be read: a runtime error naming the file.
    let missing = fx.dir.join("missing-cert.pem");
    let out = serve(&[
        "--listen",
        "0.0.0.0:0",
        "--tls-cert",
        path(&missing).as_str(),
        "--tls-key",
        path(&missing).as_str(),
    ]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("missing-cert.pem"), "{t}");

    // Loopback needs nothing; any address with --insecure.
    let (d, _) = start(&fx, "127.0.0.1:0", &[]);
    assert!(!d.ready.contains("tls="), "{}", d.ready);
    assert_eq!(d.terminate().code(), Some(0));
    let (d, port) = start(&fx, "0.0.0.0:0", &["--insecure".to_string()]);
    assert!(d.ready.contains("tcp=0.0.0.0:"), "{}", d.ready);
    if let Some(nbdinfo) = tool("nbdinfo") {
        let out = run(
            Command::new(nbdinfo)
                .arg("--size")
                .arg(format!("nbd://127.0.0.1:{port}/disk0")),
            TOOL_TIMEOUT,
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            SIZE.to_string()
        );
    }
    assert_eq!(d.terminate().code(), Some(0));
}
