# Evaluation test of the vmd NixOS modules against stub option declarations
# (stubs.nix). Run by ./run:
#
#   nix-instantiate --eval --strict --json nixos-modules/tests/eval.nix \
#     --arg nixpkgsLib /path/to/nixpkgs-lib/lib
#
# (The flake's `checks.eval` passes `lib` itself instead.)
#
# Returns { failures = [ "..." ]; render = { ... }; }: every failed check
# is one string in `failures`; `render` holds what ./run converts to TOML
# and hands to `vmd check-config` and `vmd pki ensure`.
{
  nixpkgsLib ? null,
  lib ? import nixpkgsLib,
  # Where ./run executes the rendered vmd-pki script.
  scratch ? "/tmp/vmd-eval",
}:
let
  stubs = import ./stubs.nix { inherit lib; };
  inherit (stubs) pkgs;

  argsModule = {
    _module.args.pkgs = pkgs;
  };
  guestBase = [
    stubs.nixos
    stubs.microvmGuest
    argsModule
  ];

  evalHost =
    {
      microvm ? true,
      modules,
    }:
    (lib.evalModules {
      modules = [
        stubs.nixos
        argsModule
        ../host.nix
        { networking.hostName = "ghaf-host"; }
      ]
      ++ lib.optional microvm (stubs.microvmHost guestBase)
      ++ modules;
    }).config;

  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  # A Ghaf-like host: four declarative microvms (two with declared CIDs,
  # one of them mkDefault; net-vm with QEMU arguments of its own, as Ghaf
  # adds), one from an already evaluated configuration without a CID, a
  # GUI VM client and a remote admin.
  mainModule = {
    services.vmd = {
      enable = true;
      listen.tcp = {
        enable = true;
        address = "10.0.0.1";
        openFirewall = true;
      };
      vms.net-vm = {
        protected = true;
        description = "network VM";
      };
      clients.gui-vm = {
        role = "operator";
        vms = [
          "gui-vm"
          "app-*"
        ];
        vm = "gui-vm";
      };
      clients.laptop = {
        role = "admin";
        vms = [ "*" ];
        transports = [ "tcp" ];
        tcpNetworks = [ "10.0.0.0/8" ];
      };
    };
    microvm.vms = {
      net-vm.config = {
        microvm.vsock.cid = 5;
        microvm.vcpu = 2;
        microvm.qemu.extraArgs = [
          "-device"
          "qemu-xhci"
        ];
      };
      admin-vm.config = {
        microvm.vsock.cid = lib.mkDefault 101;
      };
      gui-vm.config = {
        microvm.vcpu = 4;
        # Values microvm.nix accepts: not exactly 2048 MiB on QEMU, and
        # virtio-mem (hotplugMem) only on a machine type that has it.
        microvm.mem = 3072;
        microvm.hotplugMem = 1024;
        microvm.qemu.machine = "q35";
      };
      app-vm.config = {
        microvm.hypervisor = "cloud-hypervisor";
      };
      prebuilt-vm.evaluatedConfig = lib.evalModules {
        modules = guestBase ++ [ { networking.hostName = "prebuilt-vm"; } ];
      };
    };
  };

  main = evalHost { modules = [ mainModule ]; };
  guestOf = config: name: config.microvm.vms.${name}.config.config;
  guestCid = config: name: (guestOf config name).microvm.vsock.cid;
  guestQemuArgs = config: name: (guestOf config name).microvm.qemu.extraArgs;
  monitorArgs = name: [
    "-qmp"
    "unix:/var/lib/microvms/${name}/vmd-qmp.sock,server=on,wait=off"
  ];
  guestShares = config: name: config.microvm.vms.${name}.config.config.microvm.shares;
  svc = main.systemd.services.vmd;
  sc = svc.serviceConfig;
  pki = main.systemd.services.vmd-pki;
  settings = main.environment.etc."vmd/vmd.toml".source.value;
  inventory = main.environment.etc."vmd/inventory.toml".source.value;

  # The same VM set again, plus a VM sorted after the others: nobody moves.
  grown = evalHost {
    modules = [
      mainModule
      { microvm.vms.zz-vm.config = { }; }
    ];
  };

  # A declared CID that collides with another declared one.
  dupDeclared = evalHost {
    modules = [
      mainModule
      { microvm.vms.app-vm.config.microvm.vsock.cid = 5; }
    ];
  };
  # A VM declared only to vmd, with the CID the module assigns to app-vm.
  dupInventory = evalHost {
    modules = [
      mainModule
      { services.vmd.vms.outside-vm.vsockCid = 100; }
    ];
  };
  # What microvm.nix's QEMU runner refuses or warns about: virtio-mem on
  # the default `microvm` machine type, initialBalloonMem, exactly 2048
  # MiB (a warning; not for cloud-hypervisor).
  unrunnable = evalHost {
    modules = [
      mainModule
      {
        microvm.vms.gui-vm.config.microvm.qemu.machine = lib.mkForce "microvm";
        microvm.vms.hot-vm.config = {
          microvm.hotplugMem = 512;
          microvm.initialBalloonMem = 256;
        };
        microvm.vms.two-gib-vm.config.microvm.mem = 2048;
        microvm.vms.ch-vm.config = {
          microvm.hypervisor = "cloud-hypervisor";
          microvm.mem = 2048;
          microvm.hotplugMem = 512;
        };
      }
    ];
  };
  # Ghaf declares its VMs' CIDs (plain definitions, some mkDefault, and
  # `null` for no vsock at all): every one is kept, none is assigned.
  ghafCids = evalHost {
    modules = [
      {
        services.vmd.enable = true;
        microvm.vms = {
          gui-vm.config.microvm.vsock.cid = 100;
          admin-vm.config.microvm.vsock.cid = lib.mkDefault 10;
          audio-vm.config.microvm.vsock.cid = 3;
          no-vsock-vm.config.microvm.vsock.cid = null;
        };
      }
    ];
  };
  # A VM whose QEMU arguments are forced, dropping the module's monitor.
  forcedArgs = evalHost {
    modules = [
      mainModule
      {
        microvm.vms.gui-vm.config.microvm.qemu.extraArgs = lib.mkForce [
          "-device"
          "qemu-xhci"
        ];
      }
    ];
  };
  # vmd's monitor off.
  noMonitor = evalHost {
    modules = [
      mainModule
      { services.vmd.qemuMonitor.enable = false; }
    ];
  };
  # A prebuilt QEMU VM whose own arguments open vmd's monitor.
  prebuiltMonitor = evalHost {
    modules = [
      mainModule
      {
        microvm.vms.prebuilt-vm.evaluatedConfig = lib.mkForce (
          lib.evalModules {
            modules = guestBase ++ [
              {
                networking.hostName = "prebuilt-vm";
                microvm.vsock.cid = 7;
                microvm.qemu.extraArgs = [
                  "-qmp"
                  "unix:/var/lib/microvms/prebuilt-vm/vmd-qmp.sock,server,nowait"
                ];
              }
            ];
          }
        );
      }
    ];
  };

  # The README's example, nixos-modules/examples/ghaf-host/flake.nix, as it
  # is: its `outputs` called with stub inputs (nixosSystem evaluates the
  # modules against the stubs; microvm.nix's host module is the stub's).
  example =
    ((import ../examples/ghaf-host/flake.nix).outputs {
      nixpkgs.lib = lib // {
        nixosSystem =
          { modules, ... }:
          lib.evalModules {
            modules = [
              stubs.nixos
              argsModule
            ]
            ++ modules;
          };
      };
      microvm.nixosModules.host = stubs.microvmHost guestBase;
      vmd.nixosModules = {
        host = ../host.nix;
        guest = ../guest.nix;
      };
    }).nixosConfigurations.ghaf-host.config;
  exampleInventory = example.environment.etc."vmd/inventory.toml".source.value;
  exampleGui = guestOf example "gui-vm";

  # Assignment off: no CIDs are written, undeclared VMs have none.
  noAssign = evalHost {
    modules = [
      mainModule
      { services.vmd.assignCids.enable = false; }
    ];
  };
  # A client bound to a VM nobody declares, and a bad client name.
  badClients = evalHost {
    modules = [
      mainModule
      {
        services.vmd.clients.ghost = {
          role = "reader";
          vm = "ghost-vm";
        };
        services.vmd.clients."Bad_Name" = {
          role = "reader";
        };
      }
    ];
  };
  # A plain NixOS host without microvm.nix: VMs declared by hand.
  plain = evalHost {
    microvm = false;
    modules = [
      {
        services.vmd = {
          enable = true;
          listen.vsock.enable = false;
          listen.tcp.enable = true;
          vms.fake-a = {
            hypervisor = "qemu";
            vcpus = 1;
          };
          clients.admin = {
            role = "admin";
            vms = [ "*" ];
          };
        };
      }
    ];
  };

  evalGuest =
    modules:
    (lib.evalModules {
      modules = [
        stubs.nixos
        argsModule
        ../guest.nix
      ]
      ++ modules;
    }).config;
  # The plain host with the metrics listener, its firewall port and a
  # metrics-only client.
  withMetrics = evalHost {
    microvm = false;
    modules = [
      {
        services.vmd = {
          enable = true;
          listen.vsock.enable = false;
          listen.tcp.enable = true;
          listen.metrics = {
            enable = true;
            address = "10.0.0.1";
            openFirewall = true;
            client = "prometheus";
          };
          vms.fake-a.hypervisor = "qemu";
          clients.admin = {
            role = "admin";
            vms = [ "*" ];
          };
        };
      }
    ];
  };
  metricsSettings = withMetrics.environment.etc."vmd/vmd.toml".source.value;
  metricsClash = evalHost {
    microvm = false;
    modules = [
      {
        services.vmd = {
          enable = true;
          listen.tcp.enable = true;
          listen.metrics = {
            enable = true;
            client = "admin";
          };
          clients.admin.role = "admin";
        };
      }
    ];
  };

  guest = evalGuest [ { programs.vmctl.enable = true; } ];
  guestTcp = evalGuest [
    {
      programs.vmctl = {
        enable = true;
        hostAddress = "192.168.100.1:9876";
        connectTimeoutMs = 500;
      };
    }
  ];
  guestPanel = evalGuest [
    {
      programs.vmctl = {
        enable = true;
        panel.enable = true;
      };
    }
  ];
  clientToml = g: g.environment.etc."vmd/client.toml".source.value;

  ensureArgs = main.services.vmd.pki.ensureArgs;
  argAfter =
    flag: args:
    let
      idx = lib.filter (i: lib.elemAt args i == flag) (lib.range 0 (lib.length args - 2));
    in
    map (i: lib.elemAt args (i + 1)) idx;

  checks = [
    # The metrics listener.
    {
      name = "metrics listener: off by default, no firewall port";
      ok = !(settings.listen ? metrics) && !(lib.elem 9100 main.networking.firewall.allowedTCPPorts);
      got = settings.listen;
    }
    {
      name = "metrics listener: address, firewall port, a metrics-only client in the PKI and the policy";
      ok =
        metricsSettings.listen.metrics == { address = "10.0.0.1:9100"; }
        && lib.elem 9100 withMetrics.networking.firewall.allowedTCPPorts
        && lib.elem "prometheus" (argAfter "--client" withMetrics.services.vmd.pki.ensureArgs)
        && lib.elem {
          name = "prometheus";
          role = "metrics";
          vms = [ ];
          transports = [ "tcp" ];
        } metricsSettings.policy.identity;
      got = {
        inherit (metricsSettings) listen policy;
        ports = withMetrics.networking.firewall.allowedTCPPorts;
      };
    }
    {
      name = "metrics listener: a metrics client may not reuse a client's name";
      ok = lib.any (lib.hasInfix "listen.metrics.client") (failedAssertions metricsClash);
      got = failedAssertions metricsClash;
    }
    # CIDs: unique, stable, respecting declared ones (plain and mkDefault).
    {
      name = "assigned CIDs skip declared ones, sorted by name from the base";
      ok = main.services.vmd.assignedCids == {
        app-vm = 100;
        gui-vm = 102;
      };
      got = main.services.vmd.assignedCids;
    }
    {
      name = "assigned CIDs are written into the guests; declared ones are kept";
      ok =
        guestCid main "app-vm" == 100
        && guestCid main "gui-vm" == 102
        && guestCid main "net-vm" == 5
        && guestCid main "admin-vm" == 101;
      got = lib.genAttrs [ "app-vm" "gui-vm" "net-vm" "admin-vm" ] (guestCid main);
    }
    {
      name = "a VM sorted last does not move the others";
      ok =
        grown.services.vmd.assignedCids == {
          app-vm = 100;
          gui-vm = 102;
          zz-vm = 103;
        };
      got = grown.services.vmd.assignedCids;
    }
    {
      name = "a prebuilt VM without a CID is warned about, not assigned";
      ok =
        !(main.services.vmd.assignedCids ? prebuilt-vm)
        && lib.any (w: lib.hasInfix "prebuilt-vm" w) main.warnings;
      got = main.warnings;
    }
    {
      name = "no failed assertions in the main configuration";
      ok = failedAssertions main == [ ];
      got = failedAssertions main;
    }
    {
      name = "two declared CIDs 5 fail the duplicate assertion";
      ok = lib.any (m: lib.hasInfix "duplicate vsock CIDs: 5 (app-vm, net-vm)" m) (
        failedAssertions dupDeclared
      );
      got = failedAssertions dupDeclared;
    }
    {
      name = "a services.vmd.vms CID equal to an assigned one fails the duplicate assertion";
      ok = lib.any (m: lib.hasInfix "duplicate vsock CIDs: 100 (app-vm, outside-vm)" m) (
        failedAssertions dupInventory
      );
      got = failedAssertions dupInventory;
    }
    {
      name = "assignCids.enable = false writes no CID";
      ok =
        noAssign.services.vmd.assignedCids == { }
        && guestCid noAssign "gui-vm" == null
        && guestCid noAssign "net-vm" == 5
        && !(noAssign.environment.etc."vmd/inventory.toml".source.value.vm.gui-vm ? vsock_cid);
      got = noAssign.services.vmd.assignedCids;
    }
    {
      name = "bad clients fail their assertions";
      ok =
        let
          f = failedAssertions badClients;
        in
        lib.any (lib.hasInfix "clients.ghost.vm: no VM named ghost-vm") f
        && lib.any (lib.hasInfix "clients.Bad_Name: the name must be a DNS label") f;
      got = failedAssertions badClients;
    }

    # Delivery into the bound guest only.
    {
      name = "gui-vm gets the read-only vmd-tls virtiofs share; net-vm none";
      ok =
        guestShares main "gui-vm" == [
          {
            tag = "vmd-tls";
            proto = "virtiofs";
            source = "/var/lib/vmd/guests/gui-vm";
            mountPoint = "/etc/vmd/tls";
            readOnly = true;
          }
        ]
        && guestShares main "net-vm" == [ ];
      got = guestShares main "gui-vm";
    }

    # Inventory.
    {
      name = "inventory: gui-vm from its microvm declaration";
      ok = inventory.vm.gui-vm == {
        hypervisor = "qemu";
        vcpus = 4;
        max_vcpus = 4;
        memory_mib = 3072;
        max_memory_mib = 4096;
        vsock_cid = 102;
        control_socket = "/var/lib/microvms/gui-vm/gui-vm.sock";
        monitor_socket = "/var/lib/microvms/gui-vm/vmd-qmp.sock";
        unit = "microvm@gui-vm.service";
        protected = false;
      };
      got = inventory.vm.gui-vm;
    }
    {
      name = "inventory: net-vm protected with its description; app-vm hybrid vsock, no QMP";
      ok =
        inventory.vm.net-vm.protected
        && inventory.vm.net-vm.description == "network VM"
        && inventory.vm.net-vm.vsock_cid == 5
        && inventory.vm.app-vm.hypervisor == "cloud-hypervisor"
        && !(inventory.vm.app-vm ? control_socket)
        && !(inventory.vm.app-vm ? monitor_socket)
        && inventory.vm.app-vm.unit == "microvm@app-vm.service"
        && inventory.vm.app-vm.vsock_uds == "/var/lib/microvms/app-vm/notify.vsock"
        && lib.attrNames inventory.vm == [
          "admin-vm"
          "app-vm"
          "gui-vm"
          "net-vm"
          "prebuilt-vm"
        ];
      got = inventory.vm;
    }
    {
      name = "plain NixOS: inventory from services.vmd.vms only";
      ok =
        plain.environment.etc."vmd/inventory.toml".source.value == {
          vm.fake-a = {
            hypervisor = "qemu";
            vcpus = 1;
            protected = false;
          };
        }
        && failedAssertions plain == [ ];
      got = plain.environment.etc."vmd/inventory.toml".source.value;
    }

    # vmd's own QMP monitor, and the unit, of every microvm.
    {
      name = "every QEMU microvm built here gets vmd's monitor in its QEMU arguments, after its own";
      ok =
        guestQemuArgs main "gui-vm" == monitorArgs "gui-vm"
        && guestQemuArgs main "admin-vm" == monitorArgs "admin-vm"
        && lib.sort lib.lessThan (guestQemuArgs main "net-vm") == lib.sort lib.lessThan (
          [
            "-device"
            "qemu-xhci"
          ]
          ++ monitorArgs "net-vm"
        )
        && guestQemuArgs main "app-vm" == [ ];
      got = lib.genAttrs [ "gui-vm" "admin-vm" "net-vm" "app-vm" ] (guestQemuArgs main);
    }
    {
      name = "inventory: monitor_socket and unit for QEMU microvms; none for a prebuilt VM without the monitor, which is warned about";
      ok =
        (inventory.vm.net-vm.monitor_socket or null) == "/var/lib/microvms/net-vm/vmd-qmp.sock"
        && (inventory.vm.admin-vm.monitor_socket or null) == "/var/lib/microvms/admin-vm/vmd-qmp.sock"
        && lib.all (n: inventory.vm.${n}.unit == "microvm@${n}.service") (lib.attrNames inventory.vm)
        && !(inventory.vm.prebuilt-vm ? monitor_socket)
        && lib.any (
          w: lib.hasInfix "QEMU microvm prebuilt-vm opens no vmd monitor (it is not declared" w && lib.hasInfix "vmd-qmp.sock" w
        ) main.warnings
        && lib.length main.warnings == 2;
      got = {
        inherit (inventory) vm;
        inherit (main) warnings;
      };
    }
    {
      name = "a prebuilt VM whose own arguments open the monitor has monitor_socket and no monitor warning";
      ok =
        (prebuiltMonitor.environment.etc."vmd/inventory.toml".source.value.vm.prebuilt-vm.monitor_socket or null)
        == "/var/lib/microvms/prebuilt-vm/vmd-qmp.sock"
        && !(lib.any (lib.hasInfix "QEMU microvm prebuilt-vm") prebuiltMonitor.warnings);
      got = prebuiltMonitor.environment.etc."vmd/inventory.toml".source.value.vm.prebuilt-vm;
    }
    {
      name = "QEMU arguments forced without the monitor: no monitor_socket, and a warning naming the VM";
      ok =
        !(forcedArgs.environment.etc."vmd/inventory.toml".source.value.vm.gui-vm ? monitor_socket)
        && lib.any (
          w: lib.hasInfix "QEMU microvm gui-vm opens no vmd monitor (a higher-priority definition" w
        ) forcedArgs.warnings;
      got = forcedArgs.warnings;
    }
    {
      name = "qemuMonitor.enable = false adds no monitor and renders no monitor_socket";
      ok =
        guestQemuArgs noMonitor "gui-vm" == [ ]
        && !(noMonitor.environment.etc."vmd/inventory.toml".source.value.vm.gui-vm ? monitor_socket)
        && !(lib.any (lib.hasInfix "vmd-qmp.sock") noMonitor.warnings);
      got = guestQemuArgs noMonitor "gui-vm";
    }

    # Ghaf's own CIDs are never fought.
    {
      name = "declared CIDs (plain, mkDefault, null = no vsock) are kept and none is assigned";
      ok =
        ghafCids.services.vmd.assignedCids == { }
        && guestCid ghafCids "gui-vm" == 100
        && guestCid ghafCids "admin-vm" == 10
        && guestCid ghafCids "audio-vm" == 3
        && guestCid ghafCids "no-vsock-vm" == null
        && failedAssertions ghafCids == [ ];
      got = lib.genAttrs [ "gui-vm" "admin-vm" "audio-vm" "no-vsock-vm" ] (guestCid ghafCids);
    }

    # Combinations microvm.nix cannot run.
    {
      name = "virtio-mem on the `microvm` machine type and initialBalloonMem on QEMU fail assertions naming the VM; not on cloud-hypervisor";
      ok =
        let
          f = failedAssertions unrunnable;
        in
        lib.any (m: lib.hasInfix "microvm gui-vm sets microvm.hotplugMem" m) f
        && lib.any (m: lib.hasInfix "microvm hot-vm sets microvm.hotplugMem" m) f
        && lib.any (m: lib.hasInfix "microvm hot-vm sets microvm.initialBalloonMem" m) f
        && !(lib.any (lib.hasInfix "ch-vm") f)
        && lib.length f == 3;
      got = failedAssertions unrunnable;
    }
    {
      name = "exactly 2048 MiB on QEMU warns, naming the VM; not on cloud-hypervisor";
      ok =
        lib.any (w: lib.hasInfix "microvm two-gib-vm: QEMU hangs with exactly 2048 MiB" w) unrunnable.warnings
        && !(lib.any (lib.hasInfix "ch-vm") unrunnable.warnings)
        && !(lib.any (lib.hasInfix "2048 MiB") main.warnings);
      got = unrunnable.warnings;
    }

    # The README's example, evaluated as it is.
    {
      name = "README example: no failed assertion, no warning";
      ok = failedAssertions example == [ ] && example.warnings == [ ];
      got = {
        assertions = failedAssertions example;
        inherit (example) warnings;
      };
    }
    {
      name = "README example: the inventory (declared and assigned CIDs, memory ceiling, sockets, unit)";
      ok =
        exampleInventory.vm == {
          gui-vm = {
            description = "GUI VM";
            hypervisor = "qemu";
            vcpus = 4;
            max_vcpus = 4;
            memory_mib = 3072;
            max_memory_mib = 4096;
            vsock_cid = 100;
            control_socket = "/var/lib/microvms/gui-vm/gui-vm.sock";
            monitor_socket = "/var/lib/microvms/gui-vm/vmd-qmp.sock";
            unit = "microvm@gui-vm.service";
            protected = false;
          };
          net-vm = {
            description = "network VM";
            hypervisor = "qemu";
            vcpus = 1;
            max_vcpus = 1;
            memory_mib = 512;
            max_memory_mib = 512;
            vsock_cid = 5;
            control_socket = "/var/lib/microvms/net-vm/net-vm.sock";
            monitor_socket = "/var/lib/microvms/net-vm/vmd-qmp.sock";
            unit = "microvm@net-vm.service";
            protected = true;
          };
        };
      got = exampleInventory.vm;
    }
    {
      name = "README example: gui-vm runs q35 with vmd's monitor, its share and vmctl's client.toml";
      ok =
        exampleGui.microvm.qemu.machine == "q35"
        && exampleGui.microvm.qemu.extraArgs == monitorArgs "gui-vm"
        && map (s: s.tag) exampleGui.microvm.shares == [ "vmd-tls" ]
        && (exampleGui.environment.etc."vmd/client.toml".source.value.endpoints == [ "auto" ])
        && map (i: i.name) example.environment.etc."vmd/vmd.toml".source.value.policy.identity == [
          "admin-laptop"
          "gui-vm"
        ];
      got = exampleGui.microvm;
    }

    # Rendered config.
    {
      name = "settings: listeners, TLS paths, inventory path";
      ok =
        settings.listen.tcp == [ "10.0.0.1:9876" ]
        && settings.listen.vsock == {
          enable = true;
          port = 9876;
        }
        && settings.tls == {
          ca = "/var/lib/vmd/pki/ca.pem";
          cert = "/var/lib/vmd/pki/server.pem";
          key = "/var/lib/vmd/pki/server.key";
        }
        && settings.vms.inventory == "/etc/vmd/inventory.toml"
        && settings.vms.state_dir == "/var/lib/microvms";
      got = settings;
    }
    {
      name = "settings: one identity per client; the VM client bound and vsock-only";
      ok = settings.policy.identity == [
        {
          name = "gui-vm";
          role = "operator";
          vms = [
            "gui-vm"
            "app-*"
          ];
          bind_vm = "gui-vm";
          transports = [ "vsock" ];
        }
        {
          name = "laptop";
          role = "admin";
          vms = [ "*" ];
          transports = [ "tcp" ];
          tcp_networks = [ "10.0.0.0/8" ];
        }
      ];
      got = settings.policy.identity;
    }
    {
      name = "firewall opens the TCP port";
      ok = main.networking.firewall.allowedTCPPorts == [ 9876 ];
      got = main.networking.firewall.allowedTCPPorts;
    }

    # vmd.service
    {
      name = "vmd.service: notify, restart on failure, config path, ordering";
      ok =
        sc.Type == "notify"
        && sc.Restart == "on-failure"
        && lib.hasSuffix "/bin/vmd serve --config /etc/vmd/vmd.toml" sc.ExecStart
        && lib.elem "vmd-pki.service" svc.requires
        && lib.elem "vmd-pki.service" svc.after
        && lib.elem "multi-user.target" svc.wantedBy
        && sc.StandardError == "journal";
      got = sc;
    }
    {
      name = "vmd.service: sandbox";
      ok =
        sc.ProtectSystem == "strict"
        && sc.ProtectHome
        && sc.PrivateTmp
        && sc.NoNewPrivileges
        && sc.RestrictAddressFamilies == [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
          "AF_VSOCK"
        ]
        && sc.CapabilityBoundingSet == [ "CAP_DAC_OVERRIDE" ]
        && lib.elem "@system-service" sc.SystemCallFilter
        && sc.DevicePolicy == "closed"
        && sc.ReadWritePaths == [ "-/var/lib/microvms/app-vm" ];
      got = sc;
    }

    # vmd-pki.service
    {
      name = "vmd-pki.service: oneshot before vmd and before the bound VM";
      ok =
        pki.serviceConfig.Type == "oneshot"
        && lib.elem "vmd.service" pki.before
        && lib.elem "microvm@gui-vm.service" pki.before
        && lib.elem "microvm-virtiofsd@gui-vm.service" pki.before
        && lib.elem "microvm@gui-vm.service" pki.wantedBy
        && main.systemd.timers.vmd-pki.timerConfig.OnCalendar == "daily";
      got = pki;
    }
    {
      name = "vmd pki ensure: SANs, clients, renewal window";
      ok =
        lib.take 4 ensureArgs == [
          "pki"
          "ensure"
          "--dir"
          "/var/lib/vmd/pki"
        ]
        && argAfter "--dns" ensureArgs == [ "ghaf-host" ]
        && argAfter "--ip" ensureArgs == [ "10.0.0.1" ]
        && argAfter "--client" ensureArgs == [
          "gui-vm"
          "laptop"
        ]
        && argAfter "--renew-before-days" ensureArgs == [ "30" ];
      got = ensureArgs;
    }
    {
      name = "vmd-pki script delivers gui-vm's client material, key 0640, CA key never";
      ok =
        pki.serviceConfig.ExecStart == "${main.services.vmd.pki.script}"
        && lib.hasInfix "/var/lib/vmd/pki/clients/gui-vm.key" scriptText
        && lib.hasInfix "install -m 0640" scriptText
        && !(lib.hasInfix "ca.key" scriptText)
        && !(lib.hasInfix "laptop.key" scriptText);
      got = scriptText;
    }

    # Guest module.
    {
      name = "guest: client.toml with auto and the share's paths, no auto_tcp";
      ok = clientToml guest == {
        endpoints = [ "auto" ];
        ca = "/etc/vmd/tls/ca.pem";
        cert = "/etc/vmd/tls/client.pem";
        key = "/etc/vmd/tls/client.key";
        server_name = "vmd";
      };
      got = clientToml guest;
    }
    {
      name = "guest: hostAddress renders auto_tcp";
      ok =
        (clientToml guestTcp).auto_tcp == "tcp://192.168.100.1:9876"
        && (clientToml guestTcp).connect_timeout_ms == 500
        && guest.environment.systemPackages == [ pkgs.vmd ];
      got = clientToml guestTcp;
    }
    {
      name = "guest: panel.enable installs the package built with the panel, and the same client.toml";
      ok =
        map (p: p.name) guestPanel.environment.systemPackages == [ "vmd-panel" ]
        && clientToml guestPanel == clientToml guest;
      got = map (p: p.name) guestPanel.environment.systemPackages;
    }
  ];

  # The vmd-pki script with its directories under `scratch`, for ./run.
  scratchScript =
    (evalHost {
      modules = [
        mainModule
        {
          services.vmd.pki.dir = "${scratch}/pki";
          services.vmd.guestShareDir = "${scratch}/guests";
        }
      ];
    }).services.vmd.pki.script.text;

  # The vmd-pki script's text (the fake writeShellScript keeps it).
  scriptText = main.services.vmd.pki.script.text;

  failures = map (c: "${c.name}\n    got: ${builtins.toJSON c.got}") (
    lib.filter (c: !c.ok) checks
  );
in
{
  inherit failures;
  checked = map (c: c.name) checks;
  render = {
    inherit settings inventory ensureArgs;
    pkiScript = scratchScript;
    vmdPath = "${pkgs.vmd}/bin/vmd";
    clientToml = clientToml guestTcp;
  };
}
