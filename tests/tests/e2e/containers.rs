//! The images as real containers (SPEC §8): `deploy/image/build.sh` packs the built
//! binaries into OCI images (umoci, no registry); `crun` runs the worker and the gateway
//! from them, non-root with read-only root filesystems and the models mounted read-only,
//! inside a network namespace this test creates (loopback only). Chat goes through the
//! gateway; the gateway container is `kill -9`ed and started again on the same volume,
//! and every answered call ends with exactly one usage record in the store on that volume.
//!
//! Needs root (network namespaces, crun), `umoci`, `crun`, `curl` and `ip`; `make test`
//! installs them. On a host whose cgroups are in hybrid mode, each container starts in a
//! mount namespace of its own without the cgroup v2 mount, which crun cannot use there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{binary, models_dir, workspace_root, CHAT_MODEL};
use serde_json::{json, Value};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `crun ARGS` where crun can manage cgroups: on a hybrid host, in a mount namespace
/// without the cgroup v2 mount.
fn crun(args: &str) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "-m",
        "sh",
        "-c",
        &format!("umount /sys/fs/cgroup/unified 2>/dev/null; exec crun {args}"),
    ]);
    c
}

/// A network namespace with only loopback, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("gwct-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        run("ip", &["netns", "add", &name]);
        run(
            "ip",
            &["netns", "exec", &name, "ip", "link", "set", "lo", "up"],
        );
        Self(name)
    }

    /// `curl ARGS` inside the namespace: (HTTP status, headers and body).
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let mut all = vec!["netns", "exec", &self.0, "curl", "-s", "-i", "-m", "120"];
        all.extend_from_slice(args);
        let out = Command::new("ip").args(&all).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A container run by crun from an image of the OCI layout; killed when dropped.
struct Container {
    name: String,
    child: Child,
}

impl Container {
    /// Unpacks `image`, then runs it with `args`, its root read-only, a tmpfs on /tmp,
    /// `binds` (host folder, container path, read-only?) and the network of `netns`.
    fn start(
        layout: &Path,
        image: &str,
        work: &Path,
        netns: &Netns,
        args: &[&str],
        binds: &[(&Path, &str, bool)],
    ) -> Self {
        let name = format!(
            "{image}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let bundle = work.join(&name);
        run(
            "umoci",
            &[
                "unpack",
                "--image",
                &format!("{}:{image}", layout.display()),
                bundle.to_str().unwrap(),
            ],
        );
        let path = bundle.join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        // The image's user and entrypoint stay; the arguments are this test's.
        let entrypoint = config["process"]["args"][0].clone();
        let mut argv = vec![entrypoint];
        argv.extend(args.iter().map(|a| json!(a)));
        config["process"]["args"] = json!(argv);
        config["process"]["terminal"] = json!(false);
        assert_eq!(
            config["process"]["user"]["uid"], 65532,
            "the image runs as non-root"
        );
        config["root"]["readonly"] = json!(true);
        let mounts = config["mounts"].as_array_mut().unwrap();
        mounts.push(
            json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]}),
        );
        for (source, destination, read_only) in binds {
            let mut options = vec!["rbind"];
            options.push(if *read_only { "ro" } else { "rw" });
            mounts.push(json!({"destination": destination, "type": "bind",
                "source": source, "options": options}));
        }
        for ns in config["linux"]["namespaces"].as_array_mut().unwrap() {
            if ns["type"] == "network" {
                ns["path"] = json!(format!("/var/run/netns/{}", netns.0));
            }
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let child = crun(&format!("run --bundle {} {name}", bundle.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self { name, child }
    }

    /// `kill -9` of the container's process; its state removed.
    fn kill(&mut self) {
        let state = Command::new("crun")
            .args(["state", &self.name])
            .output()
            .unwrap();
        if let Ok(state) = serde_json::from_slice::<Value>(&state.stdout) {
            if let Some(pid) = state["pid"].as_i64().filter(|p| *p > 0) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        let _ = self.child.wait();
        let _ = crun(&format!("delete -f {}", self.name)).status();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_healthy(netns: &Netns, port: u16, what: &str) {
    let started = Instant::now();
    loop {
        let (status, _) = netns.curl(&[&format!("http://127.0.0.1:{port}/health")]);
        if status == 200 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what} in its container never became healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn header(response: &str, name: &str) -> Option<String> {
    response.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn images_run_as_containers_and_a_killed_gateway_loses_no_usage() {
    let work =
        std::env::temp_dir().join(format!("gw-containers-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work).unwrap();
    let layout = work.join("image");
    let bin_dir = binary("gateway").parent().unwrap().to_owned();
    let out = Command::new(workspace_root().join("deploy/image/build.sh"))
        .env("BIN_DIR", &bin_dir)
        .env("OUT", &layout)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/image/build.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let oci = layout.join("oci");

    // The gateway's volume: the embedded store and the spool, owned by the image's user.
    let volume: PathBuf = work.join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let store = format!("sqlite://{}/gateway.db", volume.display());
    let key = run(
        binary("gateway").to_str().unwrap(),
        &[
            "create-key",
            "--tenant",
            "containers",
            "--database-url",
            &store,
        ],
    )
    .trim()
    .to_owned();
    run("chown", &["-R", "65532:65532", volume.to_str().unwrap()]);

    let netns = Netns::new();
    let models = models_dir();
    let _worker = Container::start(
        &oci,
        "inference-worker",
        &work,
        &netns,
        &[
            "--listen",
            "127.0.0.1:18081",
            "--chat-model",
            "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            "--embedding-model",
            "/models/all-MiniLM-L6-v2",
        ],
        &[(&models, "/models", true)],
    );
    wait_healthy(&netns, 18081, "the worker");
    let gateway_args = [
        "serve",
        "--listen",
        "127.0.0.1:18080",
        "--metrics-listen",
        "127.0.0.1:19464",
        "--worker",
        "http://127.0.0.1:18081",
        "--health-interval-ms",
        "200",
        "--database-url",
        "sqlite:///var/lib/gateway/gateway.db",
        "--spool-dir",
        "/var/lib/gateway/spool",
    ];
    let binds = [(volume.as_path(), "/var/lib/gateway", false)];
    let mut gateway = Container::start(&oci, "gateway", &work, &netns, &gateway_args, &binds);
    wait_healthy(&netns, 18080, "the gateway");

    let auth = format!("Authorization: Bearer {key}");
    let mut answered = Vec::new();
    for i in 0..6 {
        let body = json!({"model": CHAT_MODEL, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": format!("Count to {i}.")}]})
        .to_string();
        let (status, response) = netns.curl(&[
            "-H",
            &auth,
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            "http://127.0.0.1:18080/v1/chat/completions",
        ]);
        assert_eq!(status, 200, "{response}");
        answered.push(header(&response, "x-request-id").expect("a request id"));
    }
    // kill -9 right after the calls; a new container on the same volume ships the spool.
    gateway.kill();
    let _gateway = Container::start(&oci, "gateway", &work, &netns, &gateway_args, &binds);
    wait_healthy(&netns, 18080, "the restarted gateway");

    let db = billing::Db::connect(&store).await.unwrap();
    let started = Instant::now();
    loop {
        let mut found = 0;
        for id in &answered {
            let n: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE request_id = $1")
                    .bind(id)
                    .fetch_one(db.pool())
                    .await
                    .unwrap();
            assert!(n <= 1, "{id} recorded {n} times");
            found += n;
        }
        if found == answered.len() as i64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{found} of {} answered calls have a usage record",
            answered.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = std::fs::remove_dir_all(&work);
}
