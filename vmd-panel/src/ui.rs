//! The window: a header, the host summary, one row per VM, and the
//! "cannot reach vmd" screen.
//!
//! 1. [`build`] makes the window and starts a future on the GTK main loop
//!    that applies each [`FromLink`] message to the panel's state and
//!    its widgets.
//! 2. The window's visibility (mapped, and its surface not minimised) is
//!    sent to the link on every change: the link sends nothing while the
//!    window cannot be seen.
//! 3. A row's buttons send [`ToLink::Act`]; force stop and resize ask for
//!    a confirmation in a modal dialog first.
//!
//! Every widget a person reads has an accessible label that names its VM
//! (`Start cold-vm`, `cold-vm state: running`), so screen readers and the
//! GUI test read the same words as the eye.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use async_channel::{Receiver, Sender};
use gtk::prelude::*;
use gtk::{gdk, glib};
use gtk4 as gtk;
use vmd_proto::{Bytes, Role, VmName};

use crate::link::{FromLink, ToLink};
use crate::model::{self, Action, ChangeScope, HostSummary, Outcome, RowChange, Rows, Series};

/// Names of the stack's pages.
const PAGE_CONNECTING: &str = "connecting";
const PAGE_UNREACHABLE: &str = "unreachable";
const PAGE_VMS: &str = "vms";

/// The widgets of one VM's row.
#[derive(Debug)]
struct RowWidgets {
    root: gtk::Box,
    state: gtk::Label,
    description: gtk::Label,
    details: gtk::Label,
    outcome: gtk::Label,
    cpu: gtk::DrawingArea,
    memory: gtk::DrawingArea,
    cpu_label: gtk::Label,
    memory_label: gtk::Label,
    buttons: Vec<(Action, gtk::Button)>,
}

/// Everything the window shows, and the widgets that show it.
#[derive(Debug)]
struct Panel {
    window: gtk::ApplicationWindow,
    to_link: Sender<ToLink>,
    stack: gtk::Stack,
    header: gtk::Label,
    host_labels: [gtk::Label; 4],
    rows_box: gtk::Box,
    empty: gtk::Label,
    attempts_box: gtk::Box,
    retry: gtk::Label,
    rows: Rows,
    widgets: HashMap<VmName, RowWidgets>,
    host: HostSummary,
    role: Option<Role>,
    /// Which VMs' rows get change buttons.
    scope: ChangeScope,
    /// What was last sent as [`ToLink::Visible`].
    visible: Option<bool>,
}

type Shared = Rc<RefCell<Panel>>;

/// Sets `widget`'s accessible label (what AT-SPI reports as its name).
fn name(widget: &impl IsA<gtk::Accessible>, text: &str) {
    widget.update_property(&[gtk::accessible::Property::Label(text)]);
}

/// A label that wraps, left-aligned, with its text as its accessible label
/// unless given another.
fn label(text: &str, accessible: Option<&str>) -> gtk::Label {
    let l = gtk::Label::builder()
        .label(text)
        .xalign(0.0)
        .wrap(true)
        .selectable(false)
        .build();
    name(&l, accessible.unwrap_or(text));
    l
}

/// Builds the window for `app` and wires it to the link's channels.
pub fn build(app: &gtk::Application, to_link: Sender<ToLink>, from_link: Receiver<FromLink>) {
    let window = gtk::ApplicationWindow::builder()
        .application(app)
        .title("VMs — vmd panel")
        .default_width(960)
        .default_height(640)
        .build();

    let header = label("Connecting to vmd…", None);
    header.add_css_class("title-4");

    // The host summary and the rows.
    let host_box = gtk::Box::builder()
        .orientation(gtk::Orientation::Vertical)
        .spacing(2)
        .accessible_role(gtk::AccessibleRole::Group)
        .build();
    name(&host_box, "Host");
    let host_labels = [
        label("Host: not read yet", None),
        label("", None),
        label("", None),
        label("", None),
    ];
    for l in &host_labels {
        host_box.append(l);
    }
    let rows_box = gtk::Box::builder()
        .orientation(gtk::Orientation::Vertical)
        .spacing(8)
        .accessible_role(gtk::AccessibleRole::List)
        .build();
    name(&rows_box, "VMs");
    let empty = label("No VMs to show yet.", None);
    rows_box.append(&empty);
    let vms_page = gtk::Box::builder()
        .orientation(gtk::Orientation::Vertical)
        .spacing(12)
        .build();
    vms_page.append(&host_box);
    vms_page.append(&gtk::Separator::new(gtk::Orientation::Horizontal));
    vms_page.append(&rows_box);
    let scrolled = gtk::ScrolledWindow::builder()
        .child(&vms_page)
        .vexpand(true)
        .hscrollbar_policy(gtk::PolicyType::Never)
        .build();

    // The cannot-reach screen.
    let unreachable = gtk::Box::builder()
        .orientation(gtk::Orientation::Vertical)
        .spacing(8)
        .valign(gtk::Align::Center)
        .build();
    let heading = label("Cannot reach vmd", None);
    heading.add_css_class("title-2");
    let tried = label("Endpoints tried:", None);
    let attempts_box = gtk::Box::builder()
        .orientation(gtk::Orientation::Vertical)
        .spacing(4)
        .accessible_role(gtk::AccessibleRole::List)
        .build();
    name(&attempts_box, "Endpoints tried");
    let retry = label("", None);
    let retry_now = gtk::Button::with_label("Retry now");
    retry_now.set_halign(gtk::Align::Start);
    for w in [
        heading.upcast_ref::<gtk::Widget>(),
        tried.upcast_ref(),
        attempts_box.upcast_ref(),
        retry.upcast_ref(),
        retry_now.upcast_ref(),
    ] {
        unreachable.append(w);
    }

    let connecting = label("Connecting to vmd…", None);
    let stack = gtk::Stack::new();
    stack.add_named(&connecting, Some(PAGE_CONNECTING));
    stack.add_named(&unreachable, Some(PAGE_UNREACHABLE));
    stack.add_named(&scrolled, Some(PAGE_VMS));
    stack.set_visible_child_name(PAGE_CONNECTING);

    let content = gtk::Box::builder()
        .orientation(gtk::Orientation::Vertical)
        .spacing(12)
        .margin_top(12)
        .margin_bottom(12)
        .margin_start(12)
        .margin_end(12)
        .build();
    content.append(&header);
    content.append(&stack);
    window.set_child(Some(&content));

    let panel: Shared = Rc::new(RefCell::new(Panel {
        window: window.clone(),
        to_link: to_link.clone(),
        stack,
        header,
        host_labels,
        rows_box,
        empty,
        attempts_box,
        retry,
        rows: Rows::default(),
        widgets: HashMap::new(),
        host: HostSummary::default(),
        role: None,
        scope: ChangeScope::Unknown,
        visible: None,
    }));

    retry_now.connect_clicked(move |_| {
        // The link is gone only when the window is; nothing to tell then.
        let _ = to_link.try_send(ToLink::RetryNow);
    });

    watch_visibility(&window, &panel);

    glib::spawn_future_local(async move {
        while let Ok(msg) = from_link.recv().await {
            handle(&panel, msg);
        }
    });

    window.present();
}

/// Step 2: tells the link whenever the window turns visible or not;
/// visible means the window is mapped and its surface is mapped and not
/// minimised.
fn watch_visibility(window: &gtk::ApplicationWindow, panel: &Shared) {
    let update = {
        let panel = Rc::downgrade(panel);
        move |window: &gtk::ApplicationWindow| {
            let Some(panel) = panel.upgrade() else { return };
            let surface = window.surface();
            let minimised = surface
                .as_ref()
                .and_then(|s| s.downcast_ref::<gdk::Toplevel>())
                .is_some_and(|t| t.state().contains(gdk::ToplevelState::MINIMIZED));
            let mapped = window.is_mapped() && surface.is_some_and(|s| s.is_mapped());
            let visible = mapped && !minimised;
            let mut p = panel.borrow_mut();
            if p.visible != Some(visible) {
                p.visible = Some(visible);
                // The link is gone only when the window is.
                let _ = p.to_link.try_send(ToLink::Visible(visible));
            }
        }
    };
    window.connect_map({
        let update = update.clone();
        move |w| update(w)
    });
    window.connect_unmap({
        let update = update.clone();
        move |w| update(w)
    });
    window.connect_realize(move |w| {
        let Some(surface) = w.surface() else { return };
        let weak = w.downgrade();
        let on_change = {
            let update = update.clone();
            move || {
                if let Some(w) = weak.upgrade() {
                    update(&w);
                }
            }
        };
        surface.connect_mapped_notify({
            let on_change = on_change.clone();
            move |_| on_change()
        });
        if let Some(toplevel) = surface.downcast_ref::<gdk::Toplevel>() {
            toplevel.connect_state_notify(move |_| on_change());
        }
    });
}

/// Step 1: one message from the link.
fn handle(panel: &Shared, msg: FromLink) {
    let mut p = panel.borrow_mut();
    match msg {
        FromLink::Connecting => {
            if p.stack.visible_child_name().as_deref() != Some(PAGE_UNREACHABLE) {
                p.stack.set_visible_child_name(PAGE_CONNECTING);
            }
        }
        FromLink::Unreachable { attempts, retry_in } => {
            while let Some(child) = p.attempts_box.first_child() {
                p.attempts_box.remove(&child);
            }
            for line in &attempts {
                p.attempts_box.append(&label(line, None));
            }
            p.retry.set_text(&format!(
                "Trying again in {} s, and again after that until vmd answers.",
                retry_in.as_secs()
            ));
            let retry_text = p.retry.text();
            name(&p.retry, &retry_text);
            set_header(&p.header, "Not connected to vmd");
            p.stack.set_visible_child_name(PAGE_UNREACHABLE);
            // The rows of the last session are stale: a new session starts
            // from a snapshot.
            let changes = p.rows.clear();
            apply_changes(&mut p, panel, changes);
        }
        FromLink::Connected {
            endpoint,
            identity,
            role,
        } => {
            p.role = role;
            let role = role.map_or_else(|| "no rights".to_owned(), |r| r.to_string());
            set_header(
                &p.header,
                &format!("Connected to {endpoint} as {identity} ({role})"),
            );
            p.stack.set_visible_child_name(PAGE_VMS);
        }
        FromLink::Host(info) => {
            p.host.update(*info);
            let lines = p.host.lines();
            for (l, text) in p.host_labels.iter().zip(lines) {
                l.set_text(&text);
                name(l, &text);
            }
        }
        FromLink::Rights(scope) => {
            if scope != p.scope {
                p.scope = scope;
                // The rows' buttons were made for the old scope; the
                // snapshot that follows draws them anew.
                let changes = p.rows.clear();
                apply_changes(&mut p, panel, changes);
            }
        }
        FromLink::Watch(event) => {
            let changes = p.rows.apply(event);
            apply_changes(&mut p, panel, changes);
        }
        FromLink::Sample(info, at) => {
            let name_ = info.name.clone();
            if let Some(row) = p.rows.get_mut(&name_) {
                row.sample(*info, at);
                refresh_row(&p, &name_);
            }
        }
        FromLink::Outcome(vm, outcome) => {
            if let Some(row) = p.rows.get_mut(&vm) {
                row.outcome = Some(*outcome);
                refresh_row(&p, &vm);
            }
        }
    }
}

fn set_header(header: &gtk::Label, text: &str) {
    header.set_text(text);
    name(header, text);
}

/// Adds, refreshes and removes row widgets after the rows changed.
fn apply_changes(p: &mut Panel, panel: &Shared, changes: Vec<RowChange>) {
    let mut added = false;
    for change in changes {
        match change {
            RowChange::Added(vm) => {
                let widgets = new_row(panel, p, &vm);
                p.widgets.insert(vm.clone(), widgets);
                added = true;
                refresh_row(p, &vm);
            }
            RowChange::Updated(vm) => refresh_row(p, &vm),
            RowChange::Removed(vm) => {
                if let Some(w) = p.widgets.remove(&vm) {
                    p.rows_box.remove(&w.root);
                }
            }
        }
    }
    if added {
        // Keep the rows sorted by name: re-append in order.
        let names: Vec<VmName> = p.rows.names().cloned().collect();
        for vm in &names {
            if let Some(w) = p.widgets.get(vm) {
                if w.root.parent().is_some() {
                    p.rows_box.remove(&w.root);
                }
                p.rows_box.append(&w.root);
            }
        }
    }
    p.empty.set_visible(p.widgets.is_empty());
}

/// A filled sparkline of the series `pick` gives, scaled to the ceiling
/// it gives (or the series' own maximum, if larger).
fn sparkline(
    area: &gtk::DrawingArea,
    panel: &Shared,
    vm: &VmName,
    pick: fn(&model::VmRow) -> (&Series, f64),
    rgb: (f64, f64, f64),
) {
    let panel = Rc::downgrade(panel);
    let vm = vm.clone();
    area.set_draw_func(move |_, cr, width, height| {
        let (w, h) = (f64::from(width), f64::from(height));
        cr.set_source_rgb(0.95, 0.95, 0.95);
        cr.rectangle(0.0, 0.0, w, h);
        // A failed cairo call only loses this frame's drawing.
        let _ = cr.fill();
        let Some(panel) = panel.upgrade() else { return };
        let Ok(p) = panel.try_borrow() else { return };
        let Some(row) = p.rows.get(&vm) else { return };
        let (series, ceiling) = pick(row);
        let top = series.max().max(ceiling).max(f64::EPSILON);
        #[allow(clippy::cast_precision_loss)] // a handful of samples
        let step = w / (model::GRAPH_SAMPLES.saturating_sub(1).max(1)) as f64;
        let start = model::GRAPH_SAMPLES.saturating_sub(series.values().len());
        cr.set_source_rgb(rgb.0, rgb.1, rgb.2);
        cr.set_line_width(1.5);
        #[allow(clippy::cast_precision_loss)]
        let first_x = start as f64 * step;
        cr.move_to(first_x, h);
        let mut last_x = first_x;
        for (i, v) in series.values().enumerate() {
            #[allow(clippy::cast_precision_loss)]
            let x = (start + i) as f64 * step;
            let y = h - 1.0 - (v / top) * (h - 2.0);
            cr.line_to(x, y);
            last_x = x;
        }
        cr.line_to(last_x, h);
        cr.close_path();
        let _ = cr.stroke_preserve();
        cr.set_source_rgba(rgb.0, rgb.1, rgb.2, 0.3);
        let _ = cr.fill();
    });
}

/// Makes the widgets of `vm`'s row (not yet placed).
fn new_row(panel: &Shared, p: &Panel, vm: &VmName) -> RowWidgets {
    let n = vm.as_str();
    let root = gtk::Box::builder()
        .orientation(gtk::Orientation::Vertical)
        .spacing(4)
        .accessible_role(gtk::AccessibleRole::ListItem)
        .build();
    name(&root, &format!("VM {n}"));
    let top = gtk::Box::new(gtk::Orientation::Horizontal, 12);
    let title = label(n, Some(&format!("VM name: {n}")));
    title.add_css_class("heading");
    title.set_wrap(false);
    let state = label("", None);
    state.set_wrap(false);
    top.append(&title);
    top.append(&state);
    let description = label("", None);
    let details = label("", None);
    let outcome = label("", None);

    let graphs = gtk::Box::new(gtk::Orientation::Horizontal, 8);
    let graph = |kind: &str| {
        let area = gtk::DrawingArea::builder()
            .content_width(180)
            .content_height(32)
            .accessible_role(gtk::AccessibleRole::Img)
            .build();
        name(&area, &format!("{n} {kind} graph"));
        area
    };
    let cpu = graph("CPU");
    let memory = graph("memory");
    // CPU in percent of one host CPU, up to 100 % (more when the guest
    // uses more); memory up to what the VM may have.
    sparkline(&cpu, panel, vm, |r| (&r.cpu, 100.0), (0.1, 0.4, 0.8));
    #[allow(clippy::cast_precision_loss)] // MiB for a graph's scale
    sparkline(
        &memory,
        panel,
        vm,
        |r| (&r.memory, model::memory_mib(&r.info) as f64),
        (0.1, 0.6, 0.3),
    );
    let cpu_label = label("CPU", None);
    let memory_label = label("Memory", None);
    cpu_label.set_wrap(false);
    memory_label.set_wrap(false);
    graphs.append(&cpu_label);
    graphs.append(&cpu);
    graphs.append(&memory_label);
    graphs.append(&memory);

    let button_box = gtk::Box::new(gtk::Orientation::Horizontal, 6);
    let info = p.rows.get(vm).map(|r| r.info.clone());
    let actions = info
        .as_ref()
        .map_or_else(Vec::new, |i| model::offered(p.role, &p.scope, i));
    let mut buttons = Vec::new();
    for action in actions {
        let button = gtk::Button::with_label(action.label());
        name(&button, &format!("{} {n}", action.label()));
        if action.needs_confirmation() {
            button.add_css_class("destructive-action");
        }
        let weak = Rc::downgrade(panel);
        let vm = vm.clone();
        button.connect_clicked(move |_| {
            if let Some(panel) = weak.upgrade() {
                ask(&panel, &vm, action);
            }
        });
        button_box.append(&button);
        buttons.push((action, button));
    }

    for w in [
        top.upcast_ref::<gtk::Widget>(),
        description.upcast_ref(),
        details.upcast_ref(),
        graphs.upcast_ref(),
        button_box.upcast_ref(),
        outcome.upcast_ref(),
    ] {
        root.append(w);
    }
    root.append(&gtk::Separator::new(gtk::Orientation::Horizontal));
    RowWidgets {
        root,
        state,
        description,
        details,
        outcome,
        cpu,
        memory,
        cpu_label,
        memory_label,
        buttons,
    }
}

/// Shows a row's current facts.
fn refresh_row(p: &Panel, vm: &VmName) {
    let (Some(row), Some(w)) = (p.rows.get(vm), p.widgets.get(vm)) else {
        return;
    };
    let n = vm.as_str();
    let state = row.state_text();
    w.state.set_text(&state);
    name(&w.state, &format!("{n} state: {state}"));
    let description = row.info.description.clone().unwrap_or_default();
    w.description.set_text(&description);
    w.description.set_visible(!description.is_empty());
    name(&w.description, &format!("{n} description: {description}"));
    let details = row.details_text();
    w.details.set_text(&details);
    name(&w.details, &format!("{n} details: {details}"));
    let outcome = row.outcome.as_ref().map(Outcome::text).unwrap_or_default();
    w.outcome.set_text(&outcome);
    w.outcome.set_visible(!outcome.is_empty());
    name(&w.outcome, &format!("{n} outcome: {outcome}"));
    let cpu = row.cpu.last().map_or_else(
        || "no reading yet".to_owned(),
        |v| format!("{v:.0}% of one CPU"),
    );
    name(&w.cpu, &format!("{n} CPU graph: {cpu}"));
    let cpu_now = row
        .cpu
        .last()
        .map_or_else(|| "CPU".to_owned(), |v| format!("CPU {v:.0}%"));
    w.cpu_label.set_text(&cpu_now);
    name(&w.cpu_label, &format!("{n} {cpu_now}"));
    let memory = row.memory.last().map_or_else(
        || "no reading yet".to_owned(),
        |v| format!("{v:.0} MiB in use"),
    );
    name(&w.memory, &format!("{n} memory graph: {memory}"));
    let memory_now = row
        .memory
        .last()
        .map_or_else(|| "Memory".to_owned(), |v| format!("Memory {v:.0} MiB"));
    w.memory_label.set_text(&memory_now);
    name(&w.memory_label, &format!("{n} {memory_now}"));
    w.cpu.queue_draw();
    w.memory.queue_draw();
    for (action, button) in &w.buttons {
        button.set_sensitive(action.fits(row.info.state));
    }
}

/// Step 3: a button was pressed; confirm first where the action asks.
fn ask(panel: &Shared, vm: &VmName, action: Action) {
    let p = panel.borrow();
    if !action.needs_confirmation() {
        send_act(&p.to_link, vm, action, (None, None));
        return;
    }
    let info = p.rows.get(vm).map(|r| r.info.clone());
    confirm(&p.window, &p.to_link, vm, action, info.as_ref());
}

fn send_act(
    to_link: &Sender<ToLink>,
    vm: &VmName,
    action: Action,
    resize: (Option<u32>, Option<Bytes>),
) {
    // The link is gone only when the window is.
    let _ = to_link.try_send(ToLink::Act {
        vm: vm.clone(),
        action,
        resize,
    });
}

/// The confirmation dialog of a force stop or a resize.
fn confirm(
    parent: &gtk::ApplicationWindow,
    to_link: &Sender<ToLink>,
    vm: &VmName,
    action: Action,
    info: Option<&vmd_proto::VmInfo>,
) {
    let n = vm.as_str();
    let title = match action {
        Action::ForceStop => format!("Force stop {n}?"),
        _ => format!("Resize {n}?"),
    };
    let dialog = gtk::Window::builder()
        .title(&title)
        .transient_for(parent)
        .modal(true)
        .resizable(false)
        .build();
    let body = gtk::Box::builder()
        .orientation(gtk::Orientation::Vertical)
        .spacing(12)
        .margin_top(16)
        .margin_bottom(16)
        .margin_start(16)
        .margin_end(16)
        .build();
    let text = match action {
        Action::ForceStop => format!(
            "Force stop kills {n} at once: its guest gets no chance to shut down cleanly and may lose data."
        ),
        _ => format!("Change the vCPUs and memory target of {n} while it runs."),
    };
    body.append(&label(&text, None));
    let vcpus = gtk::SpinButton::with_range(1.0, 512.0, 1.0);
    let memory = gtk::SpinButton::with_range(64.0, 1_048_576.0, 64.0);
    if action == Action::Resize {
        let current_vcpus = info
            .and_then(|i| i.vcpus.current.or(i.vcpus.declared))
            .unwrap_or(1);
        vcpus.set_value(f64::from(current_vcpus));
        #[allow(clippy::cast_precision_loss)] // MiB fit an f64
        memory.set_value(info.map_or(512, model::memory_mib) as f64);
        name(&vcpus, &format!("{n} vCPUs"));
        name(&memory, &format!("{n} memory in MiB"));
        let grid = gtk::Grid::builder()
            .row_spacing(6)
            .column_spacing(6)
            .build();
        grid.attach(&label("vCPUs", None), 0, 0, 1, 1);
        grid.attach(&vcpus, 1, 0, 1, 1);
        grid.attach(&label("Memory (MiB)", None), 0, 1, 1, 1);
        grid.attach(&memory, 1, 1, 1, 1);
        body.append(&grid);
    }
    let buttons = gtk::Box::new(gtk::Orientation::Horizontal, 8);
    buttons.set_halign(gtk::Align::End);
    let cancel = gtk::Button::with_label("Cancel");
    name(&cancel, &format!("Cancel {} {n}", action.verb()));
    let go_label = match action {
        Action::ForceStop => "Force stop now",
        _ => "Resize now",
    };
    let go = gtk::Button::with_label(go_label);
    name(&go, &format!("Confirm {} {n}", action.verb()));
    go.add_css_class("destructive-action");
    buttons.append(&cancel);
    buttons.append(&go);
    body.append(&buttons);
    dialog.set_child(Some(&body));

    cancel.connect_clicked({
        let dialog = dialog.clone();
        move |_| dialog.close()
    });
    go.connect_clicked({
        let dialog = dialog.clone();
        let to_link = to_link.clone();
        let vm = vm.clone();
        move |_| {
            let resize = if action == Action::Resize {
                let v = u32::try_from(vcpus.value_as_int()).ok();
                let m = u64::try_from(memory.value_as_int()).ok().map(Bytes::mib);
                (v, m)
            } else {
                (None, None)
            };
            send_act(&to_link, &vm, action, resize);
            dialog.close();
        }
    });
    dialog.present();
}
