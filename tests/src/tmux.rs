//! A terminal program under a private tmux server, for tests of terminal
//! user interfaces (`vmctl top`).
//!
//! 1. [`TmuxSession::start`] runs a shell command in a detached session of
//!    a fixed size on a server of its own (`tmux -S <socket>` in a
//!    temporary directory, no config file), so tests never meet each
//!    other's or a user's tmux.
//! 2. [`TmuxSession::screen`] reads the visible pane (`capture-pane -p`);
//!    [`TmuxSession::wait_for`] re-reads it until a condition holds.
//! 3. [`TmuxSession::keys`] types keys (`send-keys`).
//! 4. Dropping the session kills its server, also when a test panics, and
//!    removes its socket with the directory.
//!
//! Needs `tmux` (Debian package `tmux`); a missing tmux panics.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

/// How often [`TmuxSession::wait_for`] re-reads the screen.
const REREAD: Duration = Duration::from_millis(100);

/// A detached tmux session on a private server.
#[derive(Debug)]
pub struct TmuxSession {
    socket: PathBuf,
    _dir: TempDir,
}

impl TmuxSession {
    /// Runs `argv` (quoted for the shell) in a `width`×`height` session.
    /// When the program ends the pane prints `exited with <status>` and
    /// stays open, so tests can see how it ended.
    ///
    /// # Panics
    /// If tmux is missing or cannot start the session.
    pub fn start(width: u16, height: u16, argv: &[String]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmd-tmux-")
            .tempdir()
            .expect("temporary directory");
        let session = Self {
            socket: dir.path().join("socket"),
            _dir: dir,
        };
        let program: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
        let script = format!(
            "{}; echo \"exited with $?\"; exec sleep 3600",
            program.join(" ")
        );
        let out = session
            .tmux()
            .args(["new-session", "-d", "-x", &width.to_string(), "-y"])
            .arg(height.to_string())
            .args(["sh", "-c", &script])
            .output()
            .unwrap_or_else(|e| panic!("cannot run tmux (apt-get install tmux): {e}"));
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        session
    }

    fn tmux(&self) -> Command {
        let mut command = Command::new("tmux");
        command
            .arg("-S")
            .arg(&self.socket)
            .args(["-f", "/dev/null"]);
        command
    }

    /// The pane's visible text, one line per row.
    ///
    /// # Panics
    /// If tmux fails.
    pub fn screen(&self) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p"])
            .output()
            .expect("tmux capture-pane runs");
        assert!(
            out.status.success(),
            "tmux capture-pane: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Re-reads the screen until `done` holds for it; returns that screen.
    ///
    /// # Panics
    /// After `limit`, with `what` and the last screen in the message.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the screen never showed {what}:\n{screen}"
            );
            tokio::time::sleep(REREAD).await;
        }
    }

    /// Types `keys` (tmux key names: `q`, `Down`, `C-c`, …).
    ///
    /// # Panics
    /// If tmux fails.
    pub fn keys(&self, keys: &[&str]) {
        let out = self
            .tmux()
            .arg("send-keys")
            .args(keys)
            .output()
            .expect("tmux send-keys runs");
        assert!(
            out.status.success(),
            "tmux send-keys: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TmuxSession {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").output();
    }
}

/// `text` as one shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
