# services.vmd: vmd on a NixOS / Ghaf KVM host.
#
# 1. vmd-pki.service (oneshot, before vmd.service and before every microvm
#    that gets certificates) runs `vmd pki ensure` for the CA, the server
#    certificate and one client certificate per `clients.<name>`, then
#    copies a VM-bound client's certificate, key and the CA into
#    `guestShareDir/<vm>`, which the VM mounts read-only over virtiofs.
#    A timer re-runs it daily; renewed certificates are picked up by
#    reloading vmd (SIGHUP).
# 2. With microvm.nix on the host, every microvm without `microvm.vsock.cid`
#    gets a deterministic CID (`assignCids`; a CID the VM declares, as Ghaf
#    does, is never replaced), every QEMU microvm gets vmd's own QMP
#    monitor (`qemuMonitor`), and `vms.<name>` defaults come from the VM's
#    own configuration. Combinations microvm.nix cannot run fail an
#    assertion (or warn) here, naming the VM.
# 3. vmd.service (Type=notify) runs as root inside a tight sandbox; see the
#    `vmd.service` comment below for why root and which capability.
{
  config,
  lib,
  options,
  pkgs,
  ...
}:
let
  inherit (lib)
    types
    mkOption
    mkEnableOption
    mkIf
    mkMerge
    mkDefault
    mkOverride
    literalExpression
    ;

  cfg = config.services.vmd;
  settingsFormat = pkgs.formats.toml { };

  # microvm.nix is imported on this host (its host module declares these).
  hasMicrovm = options ? microvm && options.microvm ? host && options.microvm ? stateDir;
  microvmVms = if hasMicrovm then config.microvm.vms else { };
  stateDir = if hasMicrovm then config.microvm.stateDir else "/var/lib/microvms";

  # The priority of the CIDs this module writes into guests: below a plain
  # definition and below mkDefault (1000), above the option default (1500).
  # A guest whose `microvm.vsock.cid` has a higher-priority definition has
  # declared its CID; reading only the priority keeps this free of recursion.
  assignedCidPriority = 1400;

  # A microvm's evaluated NixOS system, however it is declared.
  guestOf =
    name: vm:
    if vm.config != null then
      vm.config
    else if vm.evaluatedConfig != null then
      vm.evaluatedConfig
    else if vm.flake != null then
      vm.flake.nixosConfigurations.${name}
    else
      null;

  # `{ declared = bool; cid = int or null; injectable = bool; }` per microvm.
  cidState = lib.mapAttrs (
    name: vm:
    let
      guest = guestOf name vm;
      injectable = vm.config != null;
    in
    if guest == null then
      {
        declared = false;
        cid = null;
        inherit injectable;
      }
    else if injectable then
      let
        declared = guest.options.microvm.vsock.cid.highestPrio < assignedCidPriority;
      in
      {
        inherit declared injectable;
        cid = if declared then guest.config.microvm.vsock.cid else null;
      }
    else
      {
        declared = true;
        cid = guest.config.microvm.vsock.cid;
        inherit injectable;
      }
  ) microvmVms;

  declaredCids = lib.filterAttrs (_: c: c != null) (lib.mapAttrs (_: s: s.cid) cidState);

  # Sorted names, so the same VM set always gets the same CIDs; each takes
  # the lowest free CID from `assignCids.base` up, skipping declared ones.
  assignedCids =
    let
      toAssign = lib.filter (
        n: cidState.${n}.injectable && !cidState.${n}.declared
      ) (lib.sort lib.lessThan (lib.attrNames cidState));
      used0 = lib.attrValues declaredCids;
      firstFree = c: used: if lib.elem c used then firstFree (c + 1) used else c;
      step =
        acc: name:
        let
          cid = firstFree acc.next acc.used;
        in
        {
          next = cid + 1;
          used = acc.used ++ [ cid ];
          result = acc.result // {
            ${name} = cid;
          };
        };
    in
    if cfg.enable && cfg.assignCids.enable then
      (lib.foldl' step {
        next = cfg.assignCids.base;
        used = used0;
        result = { };
      } toAssign).result
    else
      { };

  effectiveCid = name: declaredCids.${name} or assignedCids.${name} or null;

  # vmd's own QMP monitor of a QEMU microvm, next to microvm.nix's socket.
  # QEMU accepts several monitors and sends every event to each; the VM's
  # main socket stays with microvm.nix, Ghaf's memory manager and
  # vhotplug. The module adds it to every QEMU microvm built from
  # `microvm.vms.<name>.config`; a VM built elsewhere has it only if its
  # own extraArgs carry it.
  monitorSocketOf = name: "${stateDir}/${name}/vmd-qmp.sock";
  monitorArgs = name: [
    "-qmp"
    "unix:${monitorSocketOf name},server=on,wait=off"
  ];
  # Whether QEMU arguments open a monitor on that socket (any options).
  hasMonitor =
    name: args:
    let
      spec = "unix:${monitorSocketOf name}";
    in
    lib.any (
      i:
      lib.elemAt args i == "-qmp"
      && (lib.elemAt args (i + 1) == spec || lib.hasPrefix "${spec}," (lib.elemAt args (i + 1)))
    ) (lib.range 0 (lib.length args - 2));

  # microvm.nix's guests, by name (VMs whose configuration cannot be read
  # are left out).
  microvmGuests = lib.filterAttrs (_: g: g != null) (lib.mapAttrs guestOf microvmVms);
  qemuGuests = lib.filterAttrs (_: g: g.config.microvm.hypervisor == "qemu") microvmGuests;
  qemuMachineOf = g: g.config.microvm.qemu.machine or null;
  qemuArgsOf = g: g.config.microvm.qemu.extraArgs or [ ];

  # Every CID any VM will have (microvms and VMs declared only here), by VM.
  allCids = lib.filterAttrs (_: c: c != null) (
    lib.mapAttrs (_: vm: vm.vsockCid) cfg.vms // lib.mapAttrs (n: _: effectiveCid n) microvmVms
  );
  duplicateCids =
    let
      byCid = lib.groupBy (n: toString allCids.${n}) (lib.attrNames allCids);
    in
    lib.filterAttrs (_: names: lib.length names > 1) byCid;

  # Defaults for `vms.<name>` from a microvm's own configuration.
  microvmDefaults =
    name: vm:
    let
      guest = guestOf name vm;
      m = guest.config.microvm;
      socket =
        if m.socket == null then
          null
        else if lib.hasPrefix "/" m.socket then
          m.socket
        else
          "${stateDir}/${name}/${m.socket}";
      cid = effectiveCid name;
    in
    lib.mapAttrs (_: mkDefault) (
      {
        unit = "microvm@${name}.service";
        hypervisor = m.hypervisor;
        vcpus = m.vcpu;
        # microvm.nix declares no vCPU hotplug: the declared count is the most.
        maxVcpus = m.vcpu;
        memoryMib = m.mem;
        # virtio-mem hotplug raises the ceiling; a balloon only lowers memory.
        maxMemoryMib = m.mem + m.hotplugMem;
        vsockCid = cid;
        # vmd speaks QMP only: other hypervisors' sockets are not QMP.
        controlSocket = if m.hypervisor == "qemu" then socket else null;
        # vmd's own monitor, where the VM's QEMU arguments open it.
        monitorSocket =
          if m.hypervisor == "qemu" && hasMonitor name (qemuArgsOf guest) then
            monitorSocketOf name
          else
            null;
        # cloud-hypervisor's hybrid vsock socket (microvm.nix names it so).
        vsockUds =
          if m.hypervisor == "cloud-hypervisor" && cid != null then
            "${stateDir}/${name}/notify.vsock"
          else
            null;
      }
    );

  vmOpts =
    { name, ... }:
    {
      options = {
        description = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Free-form description shown by `vmctl info`.";
        };
        protected = mkOption {
          type = types.bool;
          default = false;
          description = "Visible to clients but never changed over the network (e.g. admin-vm, net-vm).";
        };
        hypervisor = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "microvm.nix hypervisor name (`qemu`, `cloud-hypervisor`, …).";
        };
        vcpus = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          description = "Declared vCPUs.";
        };
        maxVcpus = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          description = "Most vCPUs a resize may give the VM.";
        };
        memoryMib = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          description = "Declared memory in MiB.";
        };
        maxMemoryMib = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          description = "Most memory a resize may give the VM, in MiB.";
        };
        vsockCid = mkOption {
          type = types.nullOr (types.ints.between 3 4294967294);
          default = null;
          description = "The guest's vsock CID (binds VM-bound clients to it).";
        };
        controlSocket = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "The VM's main QEMU QMP socket (microvm.nix's; shared with others, used only for changes).";
        };
        monitorSocket = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = ''
            vmd's own QMP monitor of the VM, held for the VM's life (vmd's
            default: `<state_dir>/<name>/vmd-qmp.sock`). With microvm.nix:
            set for every QEMU VM whose arguments open it (see `qemuMonitor`).
          '';
        };
        vsockUds = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Host side of the VM's hybrid vsock device; vmd listens on `<vsockUds>_<port>`.";
        };
        unit = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "microvm@${name}.service";
          description = "The systemd unit that runs the VM (vmd's default: `microvm@<name>.service`).";
        };
      };
    };

  clientOpts =
    { config, ... }:
    {
      options = {
        role = mkOption {
          type = types.enum [
            "reader"
            "operator"
            "admin"
            "metrics"
            "none"
          ];
          description = "What the client may do: reader < operator < admin; `metrics` may only scrape the metrics listener.";
        };
        vms = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [
            "gui-vm"
            "app-*"
          ];
          description = "VM names or globs the role may change.";
        };
        visible = mkOption {
          type = types.nullOr (types.listOf types.str);
          default = null;
          description = "VM names or globs the client may see at all (null: every VM).";
        };
        vm = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = ''
            Bind the client to this VM: vsock peers must be this VM (its CID
            from the inventory), and the certificate, key and CA are
            delivered read-only into the VM at `guestMountPoint`.
          '';
        };
        transports = mkOption {
          type = types.nullOr (
            types.listOf (
              types.enum [
                "tcp"
                "vsock"
              ]
            )
          );
          default = null;
          defaultText = literalExpression ''if vm != null then [ "vsock" ] else null'';
          description = "Transports the client may use (null: all).";
        };
        tcpNetworks = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "10.0.0.0/8" ];
          description = "TCP peers must come from these networks (CIDR); empty: anywhere.";
        };
        spkiSha256 = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Pin the client's key (64 hex digits, from `vmd pki show`).";
        };
        guestKeyGroup = mkOption {
          type = types.ints.unsigned;
          default = 0;
          description = ''
            Numeric group id, as the guest sees it, that may read the
            delivered key (mode 0640). 0: only the guest's root.
          '';
        };
      };
      config.transports = mkIf (config.vm != null) (mkDefault [ "vsock" ]);
    };

  clientNameOk = n: builtins.match "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?" n != null;

  boundClients = lib.filterAttrs (_: c: c.vm != null) cfg.clients;
  # VM name -> client name, for delivery.
  deliveries = lib.listToAttrs (
    lib.mapAttrsToList (client: c: lib.nameValuePair c.vm client) boundClients
  );

  identityOf =
    name: c:
    lib.filterAttrs (_: v: v != null) {
      inherit name;
      inherit (c) role vms visible transports;
      bind_vm = c.vm;
      tcp_networks = if c.tcpNetworks == [ ] then null else c.tcpNetworks;
      spki_sha256 = c.spkiSha256;
    };

  inventoryValue = {
    vm = lib.mapAttrs (
      _: vm:
      lib.filterAttrs (_: v: v != null) {
        inherit (vm)
          description
          protected
          hypervisor
          vcpus
          unit
          ;
        max_vcpus = vm.maxVcpus;
        memory_mib = vm.memoryMib;
        max_memory_mib = vm.maxMemoryMib;
        vsock_cid = vm.vsockCid;
        control_socket = vm.controlSocket;
        monitor_socket = vm.monitorSocket;
        vsock_uds = vm.vsockUds;
      }
    ) cfg.vms;
  };

  configFile = settingsFormat.generate "vmd.toml" cfg.settings;
  inventoryFile = settingsFormat.generate "inventory.toml" inventoryValue;

  pkiDir = cfg.pki.dir;
  tcpAddr =
    let
      a = cfg.listen.tcp.address;
    in
    if lib.hasInfix ":" a then "[${a}]:${toString cfg.listen.tcp.port}" else "${a}:${toString cfg.listen.tcp.port}";

  metricsAddr =
    let
      a = cfg.listen.metrics.address;
    in
    if lib.hasInfix ":" a then "[${a}]:${toString cfg.listen.metrics.port}" else "${a}:${toString cfg.listen.metrics.port}";

  # Clients with a certificate: `clients.<name>`, and the metrics-only
  # client of `listen.metrics.client`.
  allClients =
    cfg.clients
    // lib.optionalAttrs (cfg.listen.metrics.enable && cfg.listen.metrics.client != null) {
      ${cfg.listen.metrics.client} = {
        role = "metrics";
        vms = [ ];
        visible = null;
        vm = null;
        transports = [ "tcp" ];
        tcpNetworks = null;
        spkiSha256 = null;
        guestKeyGroup = 0;
      };
    };

  ensureArgs = [
    "pki"
    "ensure"
    "--dir"
    pkiDir
    "--ca-name"
    cfg.pki.caName
    "--days"
    (toString cfg.pki.leafDays)
    "--renew-before-days"
    (toString cfg.pki.renewBeforeDays)
  ]
  ++ lib.concatMap (d: [
    "--dns"
    d
  ]) cfg.pki.serverDnsNames
  ++ lib.concatMap (ip: [
    "--ip"
    ip
  ]) cfg.pki.serverIps
  ++ lib.concatMap (c: [
    "--client"
    c
  ]) (lib.attrNames allClients);

  # Copies one VM's client material into its share: files are replaced
  # atomically (rename), and the directory is reset to root:root 0755 in
  # case microvm.nix's tmpfiles rule created it for its own user.
  deliverScript = lib.concatStrings (
    lib.mapAttrsToList (
      vm: client:
      let
        dir = "${cfg.guestShareDir}/${vm}";
        put = mode: group: src: dst: ''
          install -m ${mode} -o 0 -g ${toString group} ${lib.escapeShellArg src} ${lib.escapeShellArg "${dir}/.${dst}.new"}
          mv -f ${lib.escapeShellArg "${dir}/.${dst}.new"} ${lib.escapeShellArg "${dir}/${dst}"}
        '';
      in
      ''
        install -d -m 0755 -o 0 -g 0 ${lib.escapeShellArg dir}
        chown 0:0 ${lib.escapeShellArg dir}
        chmod 0755 ${lib.escapeShellArg dir}
      ''
      + put "0644" 0 "${pkiDir}/ca.pem" "ca.pem"
      + put "0644" 0 "${pkiDir}/clients/${client}.pem" "client.pem"
      + put "0640" cfg.clients.${client}.guestKeyGroup "${pkiDir}/clients/${client}.key" "client.key"
    ) deliveries
  );

  pkiScript = pkgs.writeShellScript "vmd-pki" ''
    set -euo pipefail
    umask 0077
    report="$(${lib.escapeShellArgs ([ "${lib.getExe' cfg.package "vmd"}" ] ++ ensureArgs)})"
    printf '%s\n' "$report"
    ${deliverScript}
    # After a change: vmd re-reads its certificates on reload. --no-block:
    # at boot vmd.service waits for this unit, so waiting here would deadlock.
    if printf '%s\n' "$report" | grep -qE '^(created|renewed)'; then
      systemctl --no-block try-reload-or-restart vmd.service || true
    fi
  '';

  hybridDirs = lib.unique (
    lib.mapAttrsToList (_: vm: builtins.dirOf vm.vsockUds) (
      lib.filterAttrs (_: vm: vm.vsockUds != null) cfg.vms
    )
  );

  # The module that goes into each declaratively built microvm (`config`
  # here is the guest's).
  guestModule =
    name:
    { config, ... }:
    {
      _file = "vmd/nixos-modules/host.nix (services.vmd, for microvm ${name})";
      config = mkMerge [
        (mkIf (cfg.qemuMonitor.enable && config.microvm.hypervisor == "qemu") {
          microvm.qemu.extraArgs = monitorArgs name;
        })
        (mkIf cfg.assignCids.enable {
          microvm.vsock.cid = mkOverride assignedCidPriority (assignedCids.${name} or null);
        })
        (mkIf (deliveries ? ${name}) {
          microvm.shares = [
            {
              proto = "virtiofs";
              tag = "vmd-tls";
              source = "${cfg.guestShareDir}/${name}";
              mountPoint = cfg.guestMountPoint;
              readOnly = true;
            }
          ];
        })
      ];
    };
in
{
  options.services.vmd = {
    enable = mkEnableOption "vmd, the VM information-and-control daemon";

    package = mkOption {
      type = types.package;
      default = pkgs.vmd;
      defaultText = literalExpression "pkgs.vmd";
      description = "The vmd package (provides `vmd` and `vmctl`).";
    };

    settings = mkOption {
      type = types.submodule { freeformType = settingsFormat.type; };
      default = { };
      example = literalExpression ''
        {
          limits.max_connections = 64;
          log.format = "json";
          tls.crls = [ "/var/lib/vmd/pki/crl.pem" ];
        }
      '';
      description = ''
        vmd's configuration (`/etc/vmd/vmd.toml`), see the README's
        configuration reference. The module fills in listeners, TLS paths,
        the inventory path and one `[[policy.identity]]` per client; values
        set here win. vmd rejects unknown keys, and `vmd check-config`
        validates the result.
      '';
    };

    listen.tcp = {
      enable = mkEnableOption "the TCP listener for remote clients";
      address = mkOption {
        type = types.str;
        default = "0.0.0.0";
        example = "10.0.0.1";
        description = "Address of the TCP listener.";
      };
      port = mkOption {
        type = types.port;
        default = 9876;
        description = "Port of the TCP listener.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the TCP port in the firewall.";
      };
    };

    listen.metrics = {
      enable = mkEnableOption "the metrics listener: HTTPS `GET /metrics` (OpenMetrics) behind the same mutual TLS";
      address = mkOption {
        type = types.str;
        default = "0.0.0.0";
        example = "10.0.0.1";
        description = "Address of the metrics listener.";
      };
      port = mkOption {
        type = types.port;
        default = 9100;
        description = "Port of the metrics listener.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the metrics port in the firewall.";
      };
      client = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "prometheus";
        description = ''
          Add a metrics-only client of this name: a certificate from vmd's
          CA (`<pki.dir>/clients/<name>.{pem,key}`) for the Prometheus
          server, whose identity has the `metrics` role (scrapes, nothing
          else) over TCP. Any client with a role may scrape too.
        '';
      };
    };

    listen.vsock = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Listen on AF_VSOCK (and on hybrid vsock sockets of VMs that have one) for guests.";
      };
      port = mkOption {
        type = types.ints.between 1 4294967294;
        default = 9876;
        description = "The vsock port guests connect to (on CID 2).";
      };
    };

    vms = mkOption {
      type = types.attrsOf (types.submodule vmOpts);
      default = { };
      description = ''
        The VM inventory (`/etc/vmd/inventory.toml`). With microvm.nix every
        `microvm.vms.<name>` appears here with its declared vCPUs, memory,
        limits, CID, hypervisor and QMP socket; set `protected` or
        `description`, or override any field, per VM. Autostart is read by
        vmd from `microvms.target` at run time.
      '';
    };

    clients = mkOption {
      type = types.attrsOf (types.submodule clientOpts);
      default = { };
      example = literalExpression ''
        {
          gui-vm = { role = "operator"; vms = [ "gui-vm" "app-*" ]; vm = "gui-vm"; };
          laptop = { role = "admin"; vms = [ "*" ]; transports = [ "tcp" ]; tcpNetworks = [ "10.0.0.0/8" ]; };
        }
      '';
      description = ''
        Clients: each gets a certificate from vmd's CA (`<pki.dir>/clients/<name>.{pem,key}`)
        and a `[[policy.identity]]` rule. The attribute name is the
        certificate's name (a DNS label of [a-z0-9-]).
      '';
    };

    assignCids = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Give every declaratively built microvm without `microvm.vsock.cid`
          a CID: the VMs sorted by name take the lowest free CIDs from
          `base` up, skipping every declared CID. The same VM set always
          gets the same CIDs; adding a VM can move the CIDs of VMs sorted
          after it, so declare CIDs where they must never change.
        '';
      };
      base = mkOption {
        type = types.ints.between 3 4294967294;
        default = 100;
        description = "The first CID to assign (kept apart from the small CIDs people declare by hand).";
      };
    };

    pki = {
      dir = mkOption {
        type = types.str;
        default = "/var/lib/vmd/pki";
        description = "The PKI directory (CA, server and client keys; never leaves the host).";
      };
      caName = mkOption {
        type = types.str;
        default = "vmd CA ${config.networking.hostName}";
        defaultText = literalExpression ''"vmd CA ''${config.networking.hostName}"'';
        description = "Common name of the CA when one is created.";
      };
      serverDnsNames = mkOption {
        type = types.listOf types.str;
        default = [ config.networking.hostName ];
        defaultText = literalExpression "[ config.networking.hostName ]";
        description = "DNS names of the server certificate besides `vmd` (always present).";
      };
      serverIps = mkOption {
        type = types.listOf types.str;
        default = lib.optional (
          cfg.listen.tcp.enable && !(lib.elem cfg.listen.tcp.address [ "0.0.0.0" "::" ])
        ) cfg.listen.tcp.address;
        defaultText = literalExpression "[ listen.tcp.address ] unless it is a wildcard";
        description = "IP addresses of the server certificate.";
      };
      leafDays = mkOption {
        type = types.ints.positive;
        default = 365;
        description = "Validity of server and client certificates, in days.";
      };
      renewBeforeDays = mkOption {
        type = types.ints.positive;
        default = 30;
        description = "Renew certificates with fewer days left (checked at boot and by the timer).";
      };
      renewCalendar = mkOption {
        type = types.str;
        default = "daily";
        description = "When `vmd-pki.timer` re-runs `vmd pki ensure` (systemd calendar expression).";
      };
      ensureArgs = mkOption {
        type = types.listOf types.str;
        internal = true;
        readOnly = true;
        default = ensureArgs;
        description = "The `vmd` arguments vmd-pki.service runs (for tests and inspection).";
      };
      script = mkOption {
        type = types.package;
        internal = true;
        readOnly = true;
        default = pkiScript;
        description = "The script vmd-pki.service runs.";
      };
    };

    qemuMonitor.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Give every QEMU microvm built from `microvm.vms.<name>.config` vmd's
        own QMP monitor, `<stateDir>/<name>/vmd-qmp.sock` (added to
        `microvm.qemu.extraArgs`), which vmd holds for the VM's life to
        follow its state and devices. QEMU accepts several monitors; the
        VM's main socket stays with microvm.nix and Ghaf's tools.
      '';
    };

    guestShareDir = mkOption {
      type = types.str;
      default = "/var/lib/vmd/guests";
      description = "Host directory with one subdirectory per VM that receives client material.";
    };

    guestMountPoint = mkOption {
      type = types.str;
      default = "/etc/vmd/tls";
      description = ''
        Where the share appears in the guest (read-only): `ca.pem`,
        `client.pem`, `client.key`. Under `/etc/vmd` but not `/etc/vmd`
        itself, which holds the guest's `client.toml`.
      '';
    };

    assignedCids = mkOption {
      type = types.attrsOf types.int;
      internal = true;
      readOnly = true;
      default = assignedCids;
      description = "The CIDs this module assigned, by microvm name.";
    };
  };

  # Extends microvm.nix's per-VM submodule (no default, no description: the
  # declarations merge) so each declarative microvm evaluates with the CID
  # and the share this module gives it.
  options.microvm.vms = mkOption {
    type = types.attrsOf (
      types.submodule (
        { name, ... }:
        {
          config.extraModules = mkIf cfg.enable [ (guestModule name) ];
        }
      )
    );
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = duplicateCids == { };
        message =
          "services.vmd: duplicate vsock CIDs: "
          + lib.concatStringsSep "; " (
            lib.mapAttrsToList (cid: names: "${cid} (${lib.concatStringsSep ", " names})") duplicateCids
          );
      }
      {
        assertion = lib.all (c: c >= 3) (lib.attrValues allCids);
        message = "services.vmd: vsock CIDs 0, 1 and 2 are reserved (hypervisor, loopback, host).";
      }
      {
        assertion = cfg.listen.tcp.enable || cfg.listen.vsock.enable;
        message = "services.vmd: enable listen.tcp or listen.vsock.";
      }
      {
        assertion =
          cfg.listen.metrics.client == null
          || (
            clientNameOk cfg.listen.metrics.client && !(cfg.clients ? ${cfg.listen.metrics.client})
          );
        message = "services.vmd.listen.metrics.client: must be a DNS label of [a-z0-9-] that no services.vmd.clients entry also names.";
      }
    ]
    ++ lib.mapAttrsToList (name: _: {
      assertion = clientNameOk name;
      message = "services.vmd.clients.${name}: the name must be a DNS label of [a-z0-9-] (1 to 63 characters).";
    }) cfg.clients
    ++ lib.mapAttrsToList (name: c: {
      assertion = cfg.vms ? ${c.vm};
      message = "services.vmd.clients.${name}.vm: no VM named ${c.vm} in services.vmd.vms.";
    }) boundClients
    ++ lib.mapAttrsToList (name: c: {
      assertion = lib.length (lib.filter (o: o.vm == c.vm) (lib.attrValues boundClients)) == 1;
      message = "services.vmd.clients.${name}.vm: ${c.vm} has more than one bound client (one certificate is delivered per VM).";
    }) boundClients
    # What microvm.nix's QEMU runner refuses to build (it throws while the
    # host builds): said here, with the VM's name and the way out.
    ++ lib.mapAttrsToList (name: g: {
      assertion = !(g.config.microvm.hotplugMem > 0 && qemuMachineOf g == "microvm");
      message = "services.vmd: microvm ${name} sets microvm.hotplugMem (virtio-mem) on QEMU's `microvm` machine type (microvm.nix's default on x86_64), which has no virtio-mem; microvm.nix cannot build its runner. Set microvm.qemu.machine = \"q35\" in it, or drop hotplugMem.";
    }) qemuGuests
    ++ lib.mapAttrsToList (name: g: {
      assertion = (g.config.microvm.initialBalloonMem or 0) == 0;
      message = "services.vmd: microvm ${name} sets microvm.initialBalloonMem, which microvm.nix's QEMU runner does not support.";
    }) qemuGuests
    ++ lib.mapAttrsToList (name: c: {
      assertion = microvmVms ? ${c.vm} -> microvmVms.${c.vm}.config != null;
      message = "services.vmd.clients.${name}.vm: ${c.vm} is not built from `microvm.vms.${c.vm}.config`, so its certificate share cannot be added; mount ${cfg.guestShareDir}/${c.vm} in it yourself.";
    }) boundClients;

    warnings =
      lib.mapAttrsToList (
        name: _: "services.vmd: microvm ${name} has no vsock CID and is not declared in this configuration (flake or evaluatedConfig); set microvm.vsock.cid in it."
      ) (lib.filterAttrs (n: s: !s.injectable && s.cid == null) cidState)
      ++ lib.mapAttrsToList (
        name: g: "services.vmd: microvm ${name}: QEMU hangs with exactly 2048 MiB of memory (microvm.mem; microvm.nix issue 171): give it another size, e.g. 2047 or 2560."
      ) (lib.filterAttrs (_: g: g.config.microvm.mem == 2048) qemuGuests)
      ++ lib.optionals cfg.qemuMonitor.enable (
        lib.mapAttrsToList (
          name: _:
          "services.vmd: QEMU microvm ${name} opens no vmd monitor "
          + (
            if microvmVms.${name}.config == null then
              "(it is not declared in this configuration: flake or evaluatedConfig)"
            else
              "(a higher-priority definition of its microvm.qemu.extraArgs replaced the module's)"
          )
          + ": add [ \"-qmp\" \"unix:${monitorSocketOf name},server=on,wait=off\" ] to its microvm.qemu.extraArgs; vmd follows the VM's hypervisor state and devices through it."
        ) (lib.filterAttrs (n: g: !hasMonitor n (qemuArgsOf g)) qemuGuests)
      );

    # Every microvm's unit is microvm.nix's `microvm@<name>.service`.
    services.vmd.vms = lib.mapAttrs (
      name: vm:
      if guestOf name vm == null then
        { unit = mkDefault "microvm@${name}.service"; }
      else
        microvmDefaults name vm
    ) microvmVms;

    services.vmd.settings = {
      listen = {
        tcp = mkDefault (lib.optional cfg.listen.tcp.enable tcpAddr);
        vsock = {
          enable = mkDefault cfg.listen.vsock.enable;
          port = mkDefault cfg.listen.vsock.port;
        };
        hybrid_vsock = {
          enable = mkDefault cfg.listen.vsock.enable;
          port = mkDefault cfg.listen.vsock.port;
        };
      }
      // lib.optionalAttrs cfg.listen.metrics.enable {
        metrics.address = mkDefault metricsAddr;
      };
      tls = {
        ca = mkDefault "${pkiDir}/ca.pem";
        cert = mkDefault "${pkiDir}/server.pem";
        key = mkDefault "${pkiDir}/server.key";
      };
      vms = {
        state_dir = mkDefault stateDir;
        inventory = mkDefault "/etc/vmd/inventory.toml";
      };
      policy.identity = lib.mapAttrsToList identityOf allClients;
    };

    environment.etc."vmd/vmd.toml".source = configFile;
    environment.etc."vmd/inventory.toml".source = inventoryFile;
    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedTCPPorts =
      lib.optional (cfg.listen.tcp.enable && cfg.listen.tcp.openFirewall) cfg.listen.tcp.port
      ++ lib.optional (
        cfg.listen.metrics.enable && cfg.listen.metrics.openFirewall
      ) cfg.listen.metrics.port;

    systemd.services.vmd-pki = {
      description = "vmd PKI: CA, server and client certificates";
      # Before vmd and before each VM whose share it fills (virtiofsd needs
      # the directory to exist).
      wantedBy = [
        "multi-user.target"
      ]
      ++ lib.mapAttrsToList (vm: _: "microvm@${vm}.service") deliveries;
      before = [
        "vmd.service"
      ]
      ++ lib.concatLists (
        lib.mapAttrsToList (vm: _: [
          "microvm@${vm}.service"
          "microvm-virtiofsd@${vm}.service"
        ]) deliveries
      );
      after = [ "local-fs.target" ];
      path = [
        pkgs.coreutils
        pkgs.gnugrep
        config.systemd.package
      ];
      serviceConfig = {
        Type = "oneshot";
        ExecStart = "${pkiScript}";
        StateDirectory = "vmd";
        StateDirectoryMode = "0700";
        UMask = "0077";
        ProtectSystem = "strict";
        # "-": a path that does not exist yet is not an error.
        ReadWritePaths = [
          "-${pkiDir}"
          "-${cfg.guestShareDir}"
        ];
        ProtectHome = true;
        PrivateTmp = true;
        PrivateNetwork = true;
        NoNewPrivileges = true;
        # install -o/-g and chown: the only privilege it needs.
        CapabilityBoundingSet = [
          "CAP_CHOWN"
          "CAP_FOWNER"
        ];
      };
    };

    systemd.timers.vmd-pki = {
      description = "Renew vmd certificates before they expire";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.pki.renewCalendar;
        Persistent = true;
        RandomizedDelaySec = "1h";
      };
    };

    systemd.tmpfiles.settings."10-vmd" = {
      ${cfg.guestShareDir}.d = {
        user = "root";
        group = "root";
        mode = "0755";
      };
    };

    # vmd runs as root, sandboxed. A dedicated user is not used because
    # microvm.nix's QMP sockets are `srwxr-xr-x microvm:kvm` (QEMU under
    # UMask 0022) and connecting needs write access: only `microvm` or
    # root with CAP_DAC_OVERRIDE can. Running as `microvm` would let every
    # QEMU process ptrace vmd and take its server key, and a polkit rule
    # for that user would let a QEMU escape start and stop VMs. So: root,
    # no capability but CAP_DAC_OVERRIDE (QMP sockets), read-only
    # everywhere except hybrid vsock socket directories. systemd >= 255
    # authorises uid 0 on D-Bus without capabilities or polkit.
    systemd.services.vmd = {
      description = "vmd: VM information and control";
      documentation = [ "https://github.com/tiiuae/vmd" ];
      wantedBy = [ "multi-user.target" ];
      requires = [ "vmd-pki.service" ];
      after = [
        "vmd-pki.service"
        "network.target"
        "dbus.service"
      ];
      wants = [ "dbus.service" ];
      restartTriggers = [
        configFile
        inventoryFile
      ];
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe' cfg.package "vmd"} serve --config /etc/vmd/vmd.toml";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        RestartSec = "2s";
        StandardOutput = "journal";
        StandardError = "journal";
        SyslogIdentifier = "vmd";

        CapabilityBoundingSet = [
          "CAP_DAC_OVERRIDE"
        ]
        ++ lib.optional (
          (cfg.listen.tcp.enable && cfg.listen.tcp.port < 1024)
          || (cfg.listen.vsock.enable && cfg.listen.vsock.port < 1024)
        ) "CAP_NET_BIND_SERVICE";
        AmbientCapabilities = [ ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ReadWritePaths = map (d: "-${d}") hybridDirs;
        ProtectHome = true;
        PrivateTmp = true;
        # /dev/kvm for the host probe; nothing else.
        DevicePolicy = "closed";
        DeviceAllow = [ "/dev/kvm rw" ];
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
          "AF_VSOCK"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        SystemCallErrorNumber = "EPERM";
        UMask = "0077";
      };
    };
  };
}
