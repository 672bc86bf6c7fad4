//! The command line: `--check`, exit codes, keygen, demo.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::Path;
use std::process::{Command, Output};

fn baton(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .output()
        .expect("run baton")
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("baton-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn example_files_pass_check() {
    for (cmd, file) in [("gateway", "gateway.toml"), ("client", "client.toml")] {
        let out = baton(&[
            cmd,
            "-c",
            examples().join(file).to_str().unwrap(),
            "--check",
        ]);
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let d = tempdir("bad");
    let cases = [
        ("gateway", "listen = [\"0.0.0.0:7700\"]\nmax_sesions = 3\n", "max_sesions"),
        ("gateway", "listen = [\"0.0.0.0\"]\n", "listen"),
        ("gateway", "listen = [\"0.0.0.0:1\"]\n[services.pg]\ntarget = \"db.internal\"\n", "services.pg.target"),
        ("gateway", "listen = [\"0.0.0.0:1\"]\ninactivity_timeout = \"later\"\n", "inactivity_timeout"),
        ("client", "id = \"x\"\nkey_file = \"k\"\n[gateways.g]\naddresses = [\"gw:7700\"]\n[services.s]\ngateway = \"g\"\nlisten = \"127.0.0.1\"\n", "services.s.listen"),
        ("client", "id = \"x\"\nkey_file = \"k\"\n[gateways.g]\naddresses = [\"gw:7700\"]\nmode = \"fast\"\n", "gateways.g.mode"),
        ("gateway", "listen = [\"0.0.0.0:1\"]\n[services.dns]\ntarget = \"h:53\"\nprotocol = \"sctp\"\n", "services.dns.protocol"),
        ("client", "id = \"x\"\nkey_file = \"k\"\n[udp]\nhold = 0\n[gateways.g]\naddresses = [\"gw:7700\"]\n", "udp.hold"),
    ];
    for (i, (cmd, text, key)) in cases.iter().enumerate() {
        let f = write(&d, &format!("c{i}.toml"), text);
        let out = baton(&[cmd, "-c", &f, "--check"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "case {i}: {err}");
        assert!(
            err.contains(&format!("key `{key}`")),
            "case {i}: message does not name `{key}`: {err}"
        );
    }
    // A missing or malformed key file is a configuration error too.
    let f = write(
        &d,
        "nokey.toml",
        "id = \"x\"\nkey_file = \"missing.key\"\n[gateways.g]\naddresses = [\"gw:7700\"]\n",
    );
    let out = baton(&["client", "-c", &f, "--check"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key_file"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn keygen_writes_a_private_key_and_never_overwrites() {
    let d = tempdir("keygen");
    let key = d.join("laptop.key");
    let out = baton(&["keygen", "laptop", "--out", key.to_str().unwrap()]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let public = stdout.lines().last().unwrap();
    assert!(
        public.starts_with("key = \"") && public.ends_with('"'),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.starts_with("baton-secret-key:"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let again = baton(&["keygen", "laptop", "--out", key.to_str().unwrap()]);
    assert!(!again.status.success());
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        text,
        "existing key was overwritten"
    );
    // The printed public key and the file work together in a config check.
    let gw = write(
        &d,
        "gw.toml",
        &format!("listen = [\"127.0.0.1:0\"]\n[clients.laptop]\n{public}\nservices = []\n"),
    );
    assert!(baton(&["gateway", "-c", &gw, "--check"]).status.success());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn demo_runs_and_verifies() {
    let out = baton(&["demo", "--streams", "4", "--mib", "8"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified on 4/4 streams"), "{stdout}");
    assert!(stdout.contains("result        OK"), "{stdout}");
}
