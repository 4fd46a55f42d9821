//! `vmctl top`: a live terminal view of the VMs, driven by the watch.
//!
//! 1. The terminal goes into raw mode on the alternate screen. A guard
//!    restores it on every way out of [`run`]; ratatui's panic hook
//!    restores it before a panic message is printed.
//! 2. One `select!` loop waits for the next watch event, terminal event
//!    (key, resize), action outcome or SIGTERM, updates the [`View`] and
//!    redraws. Nothing is polled: without one of those, nothing happens.
//! 3. `s`, `x` and `r` start, stop and restart the selected VM in a task of
//!    their own; what becomes of the change (accepted, then succeeded or
//!    failed, or the server's refusal) comes back on a channel and is shown
//!    in the status line.
//! 4. A failed watch leaves the last view on screen, marked stale, with
//!    the error in the status line; `q` (or Esc, Ctrl-C) quits.

use std::time::Instant;

use futures_util::StreamExt;
use ratatui::Frame;
use ratatui::crossterm::event::{
    Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers,
};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Row, Table, TableState};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use vmd_client::{Client, ClientError, error_chain};
use vmd_proto::{OperationInfo, OperationStatus, VmInfo, VmName, VmState, WatchEvent};

use crate::{Failure, output};

/// The status line until the first snapshot arrives.
const WAITING: &str = "waiting for the VMs…";

/// How long one `WaitOperation` round may last, in milliseconds.
const WAIT_ROUND_MS: u32 = 60_000;

/// One VM as shown, with what is needed to show its CPU use.
#[derive(Debug)]
struct Entry {
    info: VmInfo,
    /// When `info` arrived.
    received: Instant,
    /// CPU use between the previous update and this one, in percent of
    /// one host CPU.
    cpu_percent: Option<f64>,
}

/// A line of news for the status bar.
#[derive(Clone, Debug, PartialEq)]
enum Status {
    Info(String),
    Error(String),
}

/// Everything on screen, apart from the terminal.
#[derive(Debug)]
struct View {
    /// Sorted by name.
    entries: Vec<Entry>,
    table: TableState,
    status: Status,
    /// Who we are and where, for the title.
    title: String,
    /// The watch has failed: the table shows the last known state.
    stale: bool,
}

impl View {
    fn new(title: String) -> Self {
        Self {
            entries: Vec::new(),
            table: TableState::default(),
            status: Status::Info(WAITING.to_owned()),
            title,
            stale: false,
        }
    }

    /// Takes in a watch event that arrived at `now`.
    fn apply(&mut self, event: WatchEvent, now: Instant) {
        let selected = self.selected().cloned();
        if event.snapshot {
            self.entries
                .retain(|e| event.changed.iter().any(|vm| vm.name == e.info.name));
            if self.status == Status::Info(WAITING.to_owned()) {
                self.status = Status::Info(format!("{} VMs", event.changed.len()));
            }
        }
        self.entries
            .retain(|e| !event.removed.contains(&e.info.name));
        for info in event.changed {
            match self
                .entries
                .binary_search_by(|e| e.info.name.cmp(&info.name))
            {
                Ok(i) => {
                    let old = &self.entries[i];
                    let cpu_percent = cpu_percent(old, &info, now);
                    self.entries[i] = Entry {
                        info,
                        received: now,
                        cpu_percent,
                    };
                }
                Err(i) => self.entries.insert(
                    i,
                    Entry {
                        info,
                        received: now,
                        cpu_percent: None,
                    },
                ),
            }
        }
        // Keep the same VM selected if it is still there.
        let index = selected
            .and_then(|name| self.entries.iter().position(|e| e.info.name == name))
            .or_else(|| (!self.entries.is_empty()).then_some(0))
            .map(|i| i.min(self.entries.len().saturating_sub(1)));
        self.table.select(index);
    }

    fn selected(&self) -> Option<&VmName> {
        self.table
            .selected()
            .and_then(|i| self.entries.get(i))
            .map(|e| &e.info.name)
    }

    fn select_next(&mut self) {
        if let Some(i) = self.table.selected() {
            self.table
                .select(Some((i + 1).min(self.entries.len().saturating_sub(1))));
        }
    }

    fn select_previous(&mut self) {
        if let Some(i) = self.table.selected() {
            self.table.select(Some(i.saturating_sub(1)));
        }
    }

    /// The table rows at `now` (uptimes of running VMs move on between
    /// updates; nothing else is guessed).
    fn rows(&self, now: Instant) -> Vec<Row<'static>> {
        self.entries
            .iter()
            .map(|entry| {
                let vm = &entry.info;
                let live = matches!(vm.state, VmState::Running | VmState::Paused);
                let uptime = vm.uptime_secs.map(|secs| {
                    if live {
                        secs + now.saturating_duration_since(entry.received).as_secs()
                    } else {
                        secs
                    }
                });
                let vcpus = match vm.vcpus.max {
                    Some(max) => format!(
                        "{} max {max}",
                        output::now_of(vm.vcpus.current, vm.vcpus.declared)
                    ),
                    None => output::now_of(vm.vcpus.current, vm.vcpus.declared),
                };
                let state_style = match vm.state {
                    VmState::Running => Style::default().fg(Color::Green),
                    VmState::Failed | VmState::Unknown | VmState::Restarting => {
                        Style::default().fg(Color::Red)
                    }
                    VmState::Stopped => Style::default(),
                    VmState::Paused | VmState::Frozen | VmState::Starting | VmState::Stopping => {
                        Style::default().fg(Color::Yellow)
                    }
                };
                let name = if vm.protected {
                    format!("{} (protected)", vm.name)
                } else {
                    vm.name.to_string()
                };
                Row::new(vec![
                    Cell::from(name),
                    Cell::from(vm.state.to_string()).style(state_style),
                    Cell::from(vcpus),
                    Cell::from(output::now_of(vm.memory.current, vm.memory.declared)),
                    Cell::from(output::or_dash(vm.memory.balloon_actual)),
                    Cell::from(output::or_dash(
                        entry.cpu_percent.map(|p| format!("{p:.1}")),
                    )),
                    Cell::from(output::or_dash(uptime.map(output::duration))),
                    Cell::from(output::restart(vm)),
                    Cell::from(output::pending(vm)),
                ])
            })
            .collect()
    }

    fn draw(&mut self, frame: &mut Frame<'_>) {
        let [title, table, status, help] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(3),
            Constraint::Length(1),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        let mut heading = format!("{}  {} VMs", self.title, self.entries.len());
        if self.stale {
            heading.push_str("  (stale: the watch has ended)");
        }
        frame.render_widget(
            Line::from(heading).style(Style::default().add_modifier(Modifier::BOLD)),
            title,
        );
        let header = Row::new([
            "NAME", "STATE", "VCPUS", "MEMORY", "BALLOON", "CPU%", "UPTIME", "RESTART", "PENDING",
        ])
        .style(Style::default().add_modifier(Modifier::REVERSED));
        let widths = [
            Constraint::Min(16),
            Constraint::Length(9),
            Constraint::Length(11),
            Constraint::Length(21),
            Constraint::Length(10),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Min(10),
        ];
        let rows = self.rows(Instant::now());
        let widget = Table::new(rows, widths)
            .header(header)
            .row_highlight_style(Style::default().add_modifier(Modifier::BOLD))
            .highlight_symbol("> ");
        frame.render_stateful_widget(widget, table, &mut self.table);
        let line = match &self.status {
            Status::Info(text) => Line::from(text.as_str()),
            Status::Error(text) => Line::from(text.as_str()).style(Style::default().fg(Color::Red)),
        };
        frame.render_widget(line, status);
        frame.render_widget(
            Line::from("↑/↓ select   s start   x stop   r restart   q quit")
                .style(Style::default().add_modifier(Modifier::DIM)),
            help,
        );
    }
}

/// CPU use of `new` since `old`, if both have a CPU time and time passed.
fn cpu_percent(old: &Entry, new: &VmInfo, now: Instant) -> Option<f64> {
    let used = new.cpu_time_ns?.checked_sub(old.info.cpu_time_ns?)?;
    let elapsed = now.checked_duration_since(old.received)?.as_nanos();
    if elapsed == 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)] // display only
    let percent = used as f64 / elapsed as f64 * 100.0;
    Some(percent)
}

/// A change `top` can ask for.
#[derive(Clone, Copy, Debug)]
enum Action {
    Start,
    Stop,
    Restart,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Restart => "restart",
        }
    }
}

/// Asks for `action` on `vm` and follows the operation to its end,
/// reporting each step on `report`.
fn spawn_action(client: Client, vm: VmName, action: Action, report: mpsc::UnboundedSender<Status>) {
    tokio::spawn(async move {
        let accepted = match action {
            Action::Start => client.start(&vm).await,
            Action::Stop => client.shutdown(&vm, false, None).await,
            Action::Restart => client.restart(&vm).await,
        };
        let refused =
            |e: ClientError| Status::Error(format!("{} {vm}: {}", action.name(), error_chain(&e)));
        let mut op = match accepted {
            Ok(op) => op,
            Err(e) => {
                let _ = report.send(refused(e));
                return;
            }
        };
        let _ = report.send(outcome(&op));
        while op.status == OperationStatus::Running {
            op = match client.wait_operation(op.id, WAIT_ROUND_MS).await {
                Ok(op) => op,
                Err(e) => {
                    let _ = report.send(refused(e));
                    return;
                }
            };
        }
        let _ = report.send(outcome(&op));
    });
}

fn outcome(op: &OperationInfo) -> Status {
    let text = output::operation(op);
    match op.status {
        OperationStatus::Failed(_) => Status::Error(text),
        OperationStatus::Running | OperationStatus::Succeeded => Status::Info(text),
    }
}

/// Restores the terminal when dropped.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = ratatui::try_restore();
    }
}

/// Runs `vmctl top` until the user quits.
pub(crate) async fn run(client: &Client) -> Result<(), Failure> {
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| Failure::Usage(format!("cannot handle signals: {e}")))?;
    let welcome = client.welcome();
    let role = welcome
        .role
        .map_or_else(|| "no role".to_owned(), |r| r.to_string());
    let mut view = View::new(format!(
        "vmctl top: {} as {} ({role})",
        client.endpoint(),
        welcome.identity
    ));
    let mut terminal = ratatui::try_init().map_err(|e| {
        let _ = ratatui::try_restore();
        Failure::Usage(format!("vmctl top needs a terminal: {e}"))
    })?;
    let _guard = TerminalGuard;
    let mut watch = client.watch_stream(Vec::new());
    let mut watching = true;
    let mut keys = EventStream::new();
    let (report, mut outcomes) = mpsc::unbounded_channel();
    let redraw = |terminal: &mut ratatui::DefaultTerminal, view: &mut View| {
        terminal
            .draw(|frame| view.draw(frame))
            .map(drop)
            .map_err(|e| Failure::Usage(format!("cannot draw: {e}")))
    };
    redraw(&mut terminal, &mut view)?;
    loop {
        tokio::select! {
            event = watch.next(), if watching => match event {
                Some(Ok(event)) => view.apply(event, Instant::now()),
                Some(Err(e)) => {
                    watching = false;
                    view.stale = true;
                    view.status = Status::Error(format!("watch ended: {}", error_chain(&e)));
                }
                None => watching = false,
            },
            key = keys.next() => match key {
                Some(Ok(Event::Key(key))) => {
                    if handle_key(key, &mut view, client, &report) {
                        return Ok(());
                    }
                }
                // A resize or another event: the redraw below is enough.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Failure::Usage(format!("cannot read the terminal: {e}"))),
                None => return Ok(()),
            },
            Some(status) = outcomes.recv() => view.status = status,
            _ = terminate.recv() => return Ok(()),
        }
        redraw(&mut terminal, &mut view)?;
    }
}

/// Handles one key; true to quit.
fn handle_key(
    key: KeyEvent,
    view: &mut View,
    client: &Client,
    report: &mpsc::UnboundedSender<Status>,
) -> bool {
    if key.kind != KeyEventKind::Press {
        return false;
    }
    let action = match key.code {
        KeyCode::Char('q') | KeyCode::Esc => return true,
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return true,
        KeyCode::Up | KeyCode::Char('k') => {
            view.select_previous();
            return false;
        }
        KeyCode::Down | KeyCode::Char('j') => {
            view.select_next();
            return false;
        }
        KeyCode::Char('s') => Action::Start,
        KeyCode::Char('x') => Action::Stop,
        KeyCode::Char('r') => Action::Restart,
        _ => return false,
    };
    match view.selected().cloned() {
        Some(vm) => {
            view.status = Status::Info(format!("{} {vm}…", action.name()));
            spawn_action(client.clone(), vm, action, report.clone());
        }
        None => view.status = Status::Error("no VM selected".to_owned()),
    }
    false
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use serde_json::json;

    use super::*;

    fn vm(name: &str, state: &str, cpu_time_ns: Option<u64>) -> VmInfo {
        serde_json::from_value(json!({
            "name": name, "description": null, "hypervisor": null, "state": state,
            "autostart": null, "protected": false, "vsock_cid": null,
            "vcpus": {"declared": 1, "current": 1, "max": 4},
            "memory": {"declared": 268435456, "current": 268435456, "balloon_actual": null, "max": null},
            "pid": null, "uptime_secs": 10, "cgroup_memory": null, "cpu_time_ns": cpu_time_ns,
            "tasks": null, "pending": null
        }))
        .expect("a VmInfo")
    }

    fn event(snapshot: bool, changed: Vec<VmInfo>, removed: &[&str]) -> WatchEvent {
        WatchEvent {
            generation: 1,
            snapshot,
            changed,
            removed: removed
                .iter()
                .map(|n| VmName::new(*n).expect("valid"))
                .collect(),
        }
    }

    fn names(view: &View) -> Vec<String> {
        view.entries
            .iter()
            .map(|e| e.info.name.to_string())
            .collect()
    }

    fn screen(view: &mut View) -> String {
        let mut terminal = Terminal::new(TestBackend::new(120, 10)).expect("terminal");
        terminal.draw(|frame| view.draw(frame)).expect("draw");
        let buffer = terminal.backend().buffer();
        let width = usize::from(buffer.area.width);
        buffer
            .content
            .chunks(width)
            .map(|line| line.iter().map(|c| c.symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn events_keep_the_table_sorted_and_the_selection_on_its_vm() {
        let mut view = View::new("test".into());
        let t0 = Instant::now();
        view.apply(
            event(
                true,
                vec![vm("b", "running", None), vm("a", "stopped", None)],
                &[],
            ),
            t0,
        );
        assert_eq!(names(&view), ["a", "b"]);
        view.select_next();
        assert_eq!(
            view.selected().map(ToString::to_string).as_deref(),
            Some("b")
        );
        view.apply(event(false, vec![vm("0", "stopped", None)], &[]), t0);
        assert_eq!(names(&view), ["0", "a", "b"]);
        assert_eq!(
            view.selected().map(ToString::to_string).as_deref(),
            Some("b")
        );
        view.apply(event(false, Vec::new(), &["b"]), t0);
        assert_eq!(names(&view), ["0", "a"]);
        assert!(view.selected().is_some());
        // A snapshot replaces everything.
        view.apply(event(true, vec![vm("c", "running", None)], &[]), t0);
        assert_eq!(names(&view), ["c"]);
    }

    #[test]
    fn cpu_use_is_the_cpu_time_between_two_updates() {
        let mut view = View::new("test".into());
        let t0 = Instant::now();
        view.apply(
            event(true, vec![vm("a", "running", Some(1_000_000_000))], &[]),
            t0,
        );
        assert_eq!(view.entries[0].cpu_percent, None);
        let t1 = t0 + Duration::from_secs(2);
        view.apply(
            event(false, vec![vm("a", "running", Some(2_000_000_000))], &[]),
            t1,
        );
        let percent = view.entries[0].cpu_percent.expect("a CPU figure");
        assert!((percent - 50.0).abs() < 1e-9, "{percent}");
    }

    #[test]
    fn the_screen_shows_each_vm_and_its_state() {
        let mut view = View::new("vmctl top: tcp://h:1 as me (reader)".into());
        view.apply(
            event(
                true,
                vec![vm("gui-vm", "running", None), vm("net-vm", "stopped", None)],
                &[],
            ),
            Instant::now(),
        );
        view.status = Status::Error("stop gui-vm: forbidden: role reader".into());
        let text = screen(&mut view);
        assert!(text.contains("2 VMs"), "{text}");
        let gui = text
            .lines()
            .find(|l| l.contains("gui-vm"))
            .expect("gui-vm row");
        assert!(
            gui.contains("running") && gui.contains("1/1 max 4"),
            "{gui}"
        );
        assert!(gui.contains("256 MiB/256 MiB"), "{gui}");
        let net = text
            .lines()
            .find(|l| l.contains("net-vm"))
            .expect("net-vm row");
        assert!(net.contains("stopped"), "{net}");
        assert!(text.contains("forbidden: role reader"), "{text}");
    }
}
