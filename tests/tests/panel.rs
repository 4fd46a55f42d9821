//! The real `vmd-panel` window against a real microvm host (systemd in
//! nspawn running QEMU, see [`vmd_tests::rig`]), on a real X server
//! (Xvfb) with a window manager (openbox), read and clicked through the
//! real accessibility bus (at-spi2-core, pyatspi: `tests/a11y/atspi.py`).
//!
//! 1. The rows appear with the states systemd has; the buttons match the
//!    role (an operator gets no force stop, a protected VM no buttons).
//! 2. Start clicked in the window starts the VM: the row says running,
//!    and so does systemd.
//! 3. A VM outside the identity's change scope gets no buttons: the panel
//!    asks vmd (`Rights`) which VMs it may change.
//! 4. Minimised for 30 s (while a VM changes behind its back), the panel
//!    sends not one byte (counted by a relay in front of vmd); restored,
//!    it sends again and shows the change.
//! 5. vmd unreachable: the window says so and lists every endpoint with
//!    its error; back, the panel reconnects by itself.
//! 6. As admin: a force stop of a VM whose graceful stop still runs
//!    shows vmd's `busy` on the row; a resize beyond the VM's maximum
//!    shows vmd's refusal on the row; one within it reaches QEMU (its own count of vCPUs) and the
//!    row. Force stop asks for a confirmation; cancelled, nothing happens;
//!    confirmed, the VM stops.
//!
//! Screenshots go to `target/test-artefacts/panel-*.png`.
//!
//! It runs `target/<profile>/vmd-panel`: `cargo test --workspace` builds it
//! (through vmd-panel's own tests); alone, run `cargo build -p vmd-panel`
//! first, or an older binary is tested.

#![cfg(feature = "gui-tests")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vmd::pki::Validity;
use vmd::policy::{IdentityRule, Scope};
use vmd_proto::Role;
use vmd_tests::microvm::DeclaredVm;
use vmd_tests::rig::{AUTO, COLD, GUARDED, MicrovmRig};
use vmd_tests::workspace_binary;

/// How long anything here may take before the test gives up (a limit on
/// waiting, not a claim about speed).
const PATIENCE: Duration = Duration::from_secs(60);

/// Outside the test operator's change scope; its guest takes
/// [`SLOW_POWERDOWN`] to power off, so a graceful stop runs that long.
const SPARE: &str = "spare-vm";

/// How long `spare-vm`'s guest takes to power off.
const SLOW_POWERDOWN: Duration = Duration::from_secs(20);

/// The application's name on the accessibility bus.
const APP: &str = "vmd-panel";

/// Debian's python, which has pyatspi (a python earlier on PATH may not).
const PYTHON: &str = "/usr/bin/python3";

/// Where screenshots are kept: `target/test-artefacts`.
fn artefacts() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the target directory")
        .to_path_buf();
    let dir = target.join("test-artefacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artefacts");
    dir
}

/// Fails the test if `program` is not installed, naming its package.
fn require(program: &str, package: &str) {
    assert!(
        Path::new(program).exists(),
        "{program} is missing: install the Debian package {package} (scripts/test does as root)"
    );
}

/// An X server with a window manager and a session bus with the
/// accessibility bus, all private to the test.
#[derive(Debug)]
struct Desktop {
    dir: TempDir,
    display: String,
    bus: String,
    children: Vec<Child>,
    /// Xvfb's and dbus-daemon's stdout, kept open (a closed pipe would
    /// end them with SIGPIPE if they wrote more).
    _outputs: Vec<BufReader<tokio::process::ChildStdout>>,
}

impl Desktop {
    async fn start() -> Self {
        for (program, package) in [
            ("/usr/bin/Xvfb", "xvfb"),
            ("/usr/bin/openbox", "openbox"),
            ("/usr/bin/xdotool", "xdotool"),
            ("/usr/bin/xprop", "x11-utils"),
            ("/usr/bin/import", "imagemagick"),
            ("/usr/bin/dbus-daemon", "dbus"),
            ("/usr/libexec/at-spi-bus-launcher", "at-spi2-core"),
            (PYTHON, "python3"),
        ] {
            require(program, package);
        }
        let pyatspi = std::process::Command::new(PYTHON)
            .args(["-c", "import pyatspi"])
            .output()
            .expect("python3 runs");
        assert!(
            pyatspi.status.success(),
            "pyatspi is missing: install the Debian package python3-pyatspi: {}",
            String::from_utf8_lossy(&pyatspi.stderr)
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        for sub in ["home", "runtime", "config"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("desktop directories");
        }
        std::fs::set_permissions(
            dir.path().join("runtime"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("runtime dir mode");
        let mut children = Vec::new();

        // Xvfb on a display nobody uses (no lock file, no socket).
        let number = (90..200)
            .find(|n| {
                !Path::new(&format!("/tmp/.X{n}-lock")).exists()
                    && !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
            })
            .expect("a free X display number");
        let display = format!(":{number}");
        let xvfb = Command::new("/usr/bin/Xvfb")
            .args([&display, "-screen", "0", "1280x900x24", "-nolisten", "tcp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("Xvfb starts");
        children.push(xvfb);
        let socket = PathBuf::from(format!("/tmp/.X11-unix/X{number}"));
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !socket.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "Xvfb never listened on {display}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut outputs = Vec::new();

        // The session bus.
        let mut bus = Command::new("/usr/bin/dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .env("DISPLAY", &display)
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("dbus-daemon starts");
        let mut out = BufReader::new(bus.stdout.take().expect("dbus-daemon stdout"));
        let mut address = String::new();
        tokio::time::timeout(PATIENCE, out.read_line(&mut address))
            .await
            .expect("dbus-daemon prints its address")
            .expect("read dbus-daemon's address");
        let address = address.trim().to_owned();
        assert!(address.starts_with("unix:"), "bus address: {address:?}");
        children.push(bus);
        outputs.push(out);

        let mut desktop = Self {
            dir,
            display,
            bus: address,
            children,
            _outputs: outputs,
        };
        // The accessibility bus (and its registry, which it starts).
        let launcher = desktop
            .command("/usr/libexec/at-spi-bus-launcher")
            .arg("--launch-immediately")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("at-spi-bus-launcher starts");
        desktop.children.push(launcher);
        // The window manager, so that minimise means something.
        let log = std::fs::File::create(desktop.dir.path().join("openbox.log")).expect("log file");
        let openbox = desktop
            .command("/usr/bin/openbox")
            .arg("--sm-disable")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("openbox starts");
        desktop.children.push(openbox);
        desktop
            .wait_until("openbox manages the screen (see openbox.log)", || async {
                let out = desktop
                    .command("/usr/bin/xprop")
                    .args(["-root", "_NET_SUPPORTING_WM_CHECK"])
                    .output()
                    .await
                    .expect("xprop runs");
                String::from_utf8_lossy(&out.stdout).contains("window id")
            })
            .await;
        desktop
    }

    /// `program` in this desktop's session, its output captured.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .env("DISPLAY", &self.display)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus)
            .env("HOME", self.dir.path().join("home"))
            .env("XDG_RUNTIME_DIR", self.dir.path().join("runtime"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("GDK_BACKEND", "x11")
            .env("GTK_A11Y", "atspi")
            .env("GSK_RENDERER", "cairo")
            .env("NO_AT_BRIDGE", "0")
            .env_remove("NO_AT_BRIDGE")
            .env_remove("WAYLAND_DISPLAY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, ended as a whole when the desktop is
            // dropped (at-spi-bus-launcher starts a bus of its own).
            .process_group(0)
            .kill_on_drop(true);
        command
    }

    /// Polls `check` until it holds.
    async fn wait_until<F, Fut>(&self, what: &str, check: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "gave up waiting: {what}; openbox.log: {}",
                std::fs::read_to_string(self.dir.path().join("openbox.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The whole screen as a PNG in `target/test-artefacts`.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let path = artefacts().join(format!("panel-{name}.png"));
        let out = self
            .command("/usr/bin/import")
            .args(["-window", "root"])
            .arg(&path)
            .output()
            .await
            .expect("import runs");
        assert!(
            out.status.success(),
            "screenshot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    }

    /// Runs `xdotool args`; returns its stdout.
    async fn xdotool(&self, args: &[&str]) -> String {
        let out = self
            .command("/usr/bin/xdotool")
            .args(args)
            .output()
            .await
            .expect("xdotool runs");
        assert!(
            out.status.success(),
            "xdotool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The window's ICCCM state (`Normal`, `Iconic`).
    async fn wm_state(&self, window: &str) -> String {
        let out = self
            .command("/usr/bin/xprop")
            .args(["-id", window, "WM_STATE"])
            .output()
            .await
            .expect("xprop runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Desktop {
    /// Ends every process group this desktop started: SIGTERM (so Xvfb
    /// removes its socket and lock), then SIGKILL for what is left.
    fn drop(&mut self) {
        let groups: Vec<String> = self
            .children
            .iter()
            .filter_map(Child::id)
            .map(|pid| format!("-{pid}"))
            .collect();
        for signal in ["-TERM", "-KILL"] {
            for group in &groups {
                let _ = std::process::Command::new("kill")
                    .args([signal, "--", group])
                    .stderr(Stdio::null())
                    .status();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// A TCP relay in front of vmd that counts the bytes the panel sends.
#[derive(Debug)]
struct Relay {
    port: u16,
    target: SocketAddr,
    from_panel: Arc<AtomicU64>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Self {
        let mut relay = Self {
            port: 0,
            target,
            from_panel: Arc::new(AtomicU64::new(0)),
            stop: CancellationToken::new(),
            task: None,
        };
        relay.listen().await;
        relay
    }

    /// Listens (again, on the same port) and relays.
    async fn listen(&mut self) {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], self.port)))
            .expect("relay binds");
        let listener: TcpListener = socket.listen(16).expect("relay listens");
        self.port = listener.local_addr().expect("relay address").port();
        self.stop = CancellationToken::new();
        let stop = self.stop.clone();
        let (target, counter) = (self.target, self.from_panel.clone());
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((panel, _)) = accepted else { continue };
                        connections.spawn(pipe(panel, target, counter.clone()));
                    }
                }
            }
            // Dropping the set aborts every connection: the panel sees
            // its session end.
            connections.abort_all();
        }));
    }

    /// Closes the listener and every relayed connection.
    async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("relay task");
        }
    }

    fn bytes_from_panel(&self) -> u64 {
        self.from_panel.load(Ordering::SeqCst)
    }

    fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }
}

/// Relays one connection, counting what the panel sends.
async fn pipe(panel: TcpStream, target: SocketAddr, counter: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut panel_rx, mut panel_tx) = panel.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match panel_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            counter.fetch_add(n as u64, Ordering::SeqCst);
            if server_tx.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let down = tokio::io::copy(&mut server_rx, &mut panel_tx);
    tokio::select! {
        () = up => {}
        _ = down => {}
    }
}

/// A running `vmd-panel`, read through the accessibility bus.
struct Panel<'a> {
    desktop: &'a Desktop,
    child: Child,
}

impl<'a> Panel<'a> {
    /// Starts the real binary with `config` and waits for its window.
    async fn start(desktop: &'a Desktop, config: &Path) -> Self {
        let child = desktop
            .command(workspace_binary("vmd-panel"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("vmd-panel starts");
        let panel = Self { desktop, child };
        panel
            .wait_for("the panel's window", |t| t.contains("Connected to"))
            .await;
        panel
    }

    /// Every accessible of the panel: one `depth\trole\tname\tstates` line each.
    async fn tree(&self) -> String {
        let out = self
            .desktop
            .command(PYTHON)
            .arg(atspi_helper())
            .args(["dump", APP])
            .output()
            .await
            .expect("atspi.py runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls the tree until `pred` holds for it; returns it.
    async fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let tree = self.tree().await;
            if pred(&tree) {
                return tree;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gave up waiting for {what}; the panel shows:\n{tree}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until an accessible named `name` is shown.
    async fn wait_named(&self, name: &str) -> String {
        self.wait_for(name, |t| named(t, name)).await
    }

    /// Clicks the accessible named `name` (retrying until it is there).
    async fn click(&self, name: &str) {
        self.drive(&["click", APP, name], &format!("click {name}"))
            .await;
    }

    /// Sets the value of the accessible named `name` (a spin button),
    /// retrying until it is there.
    async fn set_value(&self, name: &str, value: u32) {
        self.drive(
            &["set", APP, name, &value.to_string()],
            &format!("set {name}"),
        )
        .await;
    }

    /// Runs `atspi.py ARGS` until it succeeds (what it acts on may not be
    /// shown yet), or gives up after [`PATIENCE`].
    async fn drive(&self, args: &[&str], what: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let out = self
                .desktop
                .command(PYTHON)
                .arg(atspi_helper())
                .args(args)
                .output()
                .await
                .expect("atspi.py runs");
            if out.status.success() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "cannot {what}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.tree().await
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The panel's X window.
    async fn window(&self) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let out = self
                .desktop
                .command("/usr/bin/xdotool")
                .args(["search", "--name", "vmd panel"])
                .output()
                .await
                .expect("xdotool runs");
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(id) = text.lines().next() {
                return id.trim().to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no window named 'vmd panel'"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn quit(mut self) {
        // The panel has no state to save: end it.
        self.child.start_kill().expect("kill vmd-panel");
        let _ = self.child.wait().await;
    }
}

fn atspi_helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("a11y/atspi.py")
}

/// Whether the tree has an accessible named exactly `name`.
fn named(tree: &str, name: &str) -> bool {
    tree.lines().any(|l| l.split('\t').nth(2) == Some(name))
}

/// Whether the tree has an accessible whose name starts with `prefix`.
fn named_prefix(tree: &str, prefix: &str) -> bool {
    tree.lines()
        .filter_map(|l| l.split('\t').nth(2))
        .any(|n| n.starts_with(prefix))
}

/// A client.toml for `identity` (a fresh certificate) reaching `endpoints`.
fn client_config(rig: &MicrovmRig, dir: &Path, identity: &str, endpoints: &[String]) -> PathBuf {
    let pki = &rig.server.pki;
    let (cert, key) = pki.client_files(pki.ca(), identity, Validity::days_from_now(1));
    let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    let text = format!(
        "endpoints = [{}]\nca = {:?}\ncert = {:?}\nkey = {:?}\nconnect_timeout_ms = 2000\n",
        list.join(", "),
        pki.ca_cert().display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    );
    let path = dir.join(format!("{identity}.toml"));
    std::fs::write(&path, text).expect("write client.toml");
    path
}

/// A local TCP port with nothing listening on it.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panel_shows_and_controls_real_vms() {
    let desktop = Desktop::start().await;
    let rig = MicrovmRig::with_vms(
        &[
            DeclaredVm::new(AUTO).autostart(),
            DeclaredVm::new(COLD),
            DeclaredVm::new(GUARDED).autostart().protected(),
            DeclaredVm::new(SPARE)
                .autostart()
                .powering_down_after(SLOW_POWERDOWN),
        ],
        |c| {
            c.policy.identities.push(IdentityRule {
                change: Scope::of([AUTO, COLD]),
                ..IdentityRule::new("panel-op", Some(Role::Operator))
            });
        },
    )
    .await;
    let mut relay = Relay::start(rig.server.tcp_addr()).await;
    let configs = tempfile::tempdir().expect("temporary directory");
    let dead = format!("tcp://127.0.0.1:{}", dead_port());
    let endpoints = [relay.endpoint(), dead.clone()];

    // 1. The rows, their states, the operator's buttons.
    let operator = client_config(&rig, configs.path(), "panel-op", &endpoints);
    let panel = Panel::start(&desktop, &operator).await;
    let tree = panel
        .wait_for("every row with its state", |t| {
            named(t, "auto-vm state: running")
                && named(t, "cold-vm state: stopped")
                && named(t, "admin-vm state: running")
                && named(t, "spare-vm state: running")
        })
        .await;
    assert!(
        named_prefix(&tree, &format!("Connected to {}", relay.endpoint())),
        "{tree}"
    );
    assert!(
        named(&tree, "Start cold-vm") && named(&tree, "Stop auto-vm"),
        "{tree}"
    );
    assert!(
        !named(&tree, "Force stop auto-vm") && !named(&tree, "Resize auto-vm"),
        "an operator is offered admin actions:\n{tree}"
    );
    assert!(
        !named_prefix(&tree, "Stop admin-vm") && !named_prefix(&tree, "Start admin-vm"),
        "a protected VM is offered changes:\n{tree}"
    );
    // 3. Outside the change scope: no buttons (the server said which).
    assert!(
        !named_prefix(&tree, "Start spare-vm") && !named_prefix(&tree, "Restart spare-vm"),
        "a VM outside the change scope is offered changes:\n{tree}"
    );
    panel
        .wait_for("the host summary and a graph reading", |t| {
            named_prefix(t, "Load: ")
                && named_prefix(t, "auto-vm CPU graph: ")
                && !named(t, "auto-vm CPU graph: no reading yet")
        })
        .await;
    desktop.screenshot("rows").await;

    // 2. Start, clicked in the window.
    panel.click("Start cold-vm").await;
    panel.wait_named("cold-vm state: running").await;
    assert_eq!(rig.active_state(COLD).await, "active");
    panel
        .wait_for("the start's outcome", |t| {
            named(t, "cold-vm outcome: start: done")
        })
        .await;
    let shot = desktop.screenshot("started").await;
    assert!(std::fs::metadata(&shot).expect("screenshot").len() > 1000);

    // 4. Minimised: not one byte for 30 s, even while a VM changes.
    let window = panel.window().await;
    desktop.xdotool(&["windowminimize", &window]).await;
    desktop
        .wait_until("the window is iconic", || async {
            desktop.wm_state(&window).await.contains("Iconic")
        })
        .await;
    // Let a graph read that was under way finish.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = relay.bytes_from_panel();
    let out = rig.vmctl("admin", &["stop", COLD, "--wait"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = relay.bytes_from_panel() - before;
    assert_eq!(during, 0, "the minimised panel sent {during} bytes in 30 s");
    desktop.xdotool(&["windowactivate", &window]).await;
    desktop
        .wait_until("the window is restored", || async {
            desktop.wm_state(&window).await.contains("Normal")
        })
        .await;
    panel.wait_named("cold-vm state: stopped").await;
    desktop
        .wait_until("the restored panel reads again", || async {
            relay.bytes_from_panel() > before
        })
        .await;

    // 5. Cannot reach vmd, then back.
    relay.stop().await;
    let tree = panel
        .wait_for("the cannot-reach screen with both endpoints", |t| {
            named(t, "Not connected to vmd")
                && named_prefix(t, &format!("cannot connect to {}", relay.endpoint()))
                && named_prefix(t, &format!("cannot connect to {dead}"))
        })
        .await;
    assert!(
        !named(&tree, "auto-vm state: running"),
        "stale rows shown:\n{tree}"
    );
    desktop.screenshot("unreachable").await;
    relay.listen().await;
    panel
        .wait_for("the rows, after reconnecting", |t| {
            named(t, "auto-vm state: running") && named_prefix(t, "Connected to")
        })
        .await;
    panel.quit().await;

    // 6. An admin's force stop asks first.
    let admin = client_config(&rig, configs.path(), "admin", &endpoints);
    let panel = Panel::start(&desktop, &admin).await;
    panel.wait_named("auto-vm state: running").await;
    // A change while another runs: vmd's `busy`, on the row (the guest
    // takes 20 s to power off, so the graceful stop is still running).
    let out = rig.vmctl("admin", &["stop", SPARE]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    panel
        .wait_for("spare-vm's stop under way", |t| {
            named_prefix(t, "spare-vm state: stopping")
                || named(t, "spare-vm state: running (shutdown in progress)")
        })
        .await;
    panel.click("Force stop spare-vm").await;
    panel.click("Confirm force stop spare-vm").await;
    panel
        .wait_for("busy on spare-vm's row", |t| {
            named(
                t,
                "spare-vm outcome: force stop: busy: spare-vm is running shutdown",
            )
        })
        .await;
    desktop.screenshot("busy").await;

    // A resize beyond the maximum (4): vmd's refusal, on the row.
    panel.click("Resize auto-vm").await;
    panel.set_value("auto-vm vCPUs", 5).await;
    panel.click("Confirm resize auto-vm").await;
    panel
        .wait_for("the refused resize on the row", |t| {
            named_prefix(
                t,
                "auto-vm outcome: resize: invalid argument: vcpus 5 exceeds the maximum of 4",
            ) && !named(t, "Confirm resize auto-vm")
        })
        .await;
    // Within it: QEMU runs three vCPUs, and the row says so.
    panel.click("Resize auto-vm").await;
    panel.set_value("auto-vm vCPUs", 3).await;
    desktop.screenshot("resize").await;
    panel.click("Confirm resize auto-vm").await;
    panel
        .wait_for("the resize done and shown", |t| {
            named(t, "auto-vm outcome: resize: done") && named_prefix(t, "auto-vm details: 3 vCPUs")
        })
        .await;
    let cpus = rig
        .main_socket_command(AUTO, "query-cpus-fast", None)
        .await
        .expect("QEMU answers on its main socket");
    assert_eq!(cpus.as_array().map(Vec::len), Some(3), "{cpus}");

    panel.click("Force stop auto-vm").await;
    panel.wait_named("Confirm force stop auto-vm").await;
    desktop.screenshot("confirm").await;
    panel.click("Cancel force stop auto-vm").await;
    panel
        .wait_for("the dialog to close", |t| {
            !named(t, "Confirm force stop auto-vm")
        })
        .await;
    assert_eq!(
        rig.active_state(AUTO).await,
        "active",
        "cancel stopped the VM"
    );
    panel.click("Force stop auto-vm").await;
    panel.click("Confirm force stop auto-vm").await;
    panel
        .wait_for("auto-vm stopped by force", |t| {
            named(t, "auto-vm state: stopped") || named(t, "auto-vm state: failed")
        })
        .await;
    assert_ne!(rig.active_state(AUTO).await, "active");
    panel.quit().await;
    relay.stop().await;
}
