# The README's example against microvm.nix's REAL guest options and its
# REAL QEMU runner, for a machine that has a microvm.nix checkout (nothing
# of it is in this repository; CI has none, and ./run says NOT RUN):
#
#   MICROVM_SRC=/path/to/microvm.nix NIXPKGS_LIB=/path/to/nixpkgs.lib/lib \
#     nixos-modules/tests/run
#
# Each microvm of examples/ghaf-host/flake.nix is evaluated with
# microvm.nix's nixos-modules/microvm/options.nix (its declarations and
# defaults, e.g. `qemu.machine = "microvm"` on x86_64) in place of the stub
# guest options, the host side being services.vmd and the stub
# `microvm.vms` (stubs.nix). Then microvm.nix's lib/runners/qemu.nix builds
# each QEMU VM's command line, which is where microvm.nix throws on
# virtio-mem with the `microvm` machine type and warns on 2048 MiB. What
# stays a stub: NixOS itself (stubs.nix, plus kernel, initrd and toplevel
# below) and the package set (fake derivations: nothing is built).
#
# `variant`: "example" (the file as it is) or "old-readme" (gui-vm with the
# README's old values: mem 2048, hotplugMem 2048, the default machine).
# Returns, per QEMU VM, whether the runner's command evaluates and the
# command; and the host's failed assertions and warnings.
{
  nixpkgsLib,
  microvmSrc,
  variant ? "example",
}:
let
  # nixpkgs' lib on Debian's Nix 2.8: stand-ins for two newer builtins.
  scope = {
    builtins = builtins // {
      readFileType = builtins.readFileType or (p: (builtins.readDir (dirOf p)).${baseNameOf p});
      addDrvOutputDependencies = builtins.addDrvOutputDependencies or (x: x);
    };
    import = scopedImport scope;
  };
  lib = scopedImport scope nixpkgsLib;
  stubs = import ./stubs.nix { inherit lib; };

  fakeDrv =
    name: extra:
    {
      type = "derivation";
      inherit name;
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
      out = fakeDrv name { };
      override = _: fakeDrv name extra;
      overrideAttrs = _: fakeDrv name extra;
      configureFlags = [ ];
      buildInputs = [ ];
      meta.mainProgram = name;
    }
    // extra;
  # The package set microvm.nix's options and QEMU runner read (x86_64).
  pkgs = stubs.pkgs // {
    _type = "pkgs";
    inherit lib;
    stdenv.hostPlatform = {
      system = "x86_64-linux";
      isLinux = true;
      isDarwin = false;
      isx86_64 = true;
      isAarch64 = false;
      linux-kernel.target = "bzImage";
    };
    qemu = fakeDrv "qemu" { };
    qemu_kvm = fakeDrv "qemu" { };
  };
  argsModule = {
    _module.args.pkgs = pkgs;
  };

  # The NixOS options microvm.nix's options.nix reads in its defaults.
  nixosForMicrovm =
    { lib, ... }:
    {
      options = {
        boot.kernelPackages = lib.mkOption {
          type = lib.types.anything;
          default.kernel = fakeDrv "linux" { version = "6.12"; };
        };
        system.build = lib.mkOption {
          type = lib.types.lazyAttrsOf lib.types.anything;
          default = {
            initialRamdisk = fakeDrv "initrd" { };
            toplevel = fakeDrv "toplevel" { };
          };
        };
        system.boot.loader.initrdFile = lib.mkOption {
          type = lib.types.str;
          default = "initrd";
        };
      };
    };
  guestBase = [
    stubs.nixos
    argsModule
    nixosForMicrovm
    (microvmSrc + "/nixos-modules/microvm/options.nix")
  ];

  oldReadme = {
    microvm.vms.gui-vm.config = {
      microvm.mem = lib.mkForce 2048;
      microvm.hotplugMem = lib.mkForce 2048;
      microvm.qemu.machine = lib.mkForce "microvm";
    };
  };

  host =
    ((import ../examples/ghaf-host/flake.nix).outputs {
      nixpkgs.lib = lib // {
        nixosSystem =
          { modules, ... }:
          lib.evalModules {
            modules = [
              stubs.nixos
              argsModule
            ]
            ++ modules
            ++ lib.optional (variant == "old-readme") oldReadme;
          };
      };
      microvm.nixosModules.host = stubs.microvmHost guestBase;
      vmd.nixosModules = {
        host = ../host.nix;
        guest = ../guest.nix;
      };
    }).nixosConfigurations.ghaf-host.config;

  microvmLib = import (microvmSrc + "/lib") { inherit lib; };
  runnerOf =
    name: guest:
    import (microvmSrc + "/lib/runners/qemu.nix") {
      inherit pkgs;
      microvmConfig = guest.microvm // {
        inherit (guest.networking) hostName;
        hypervisor = "qemu";
        # Set by microvm.nix's store-disk.nix, which is not imported.
        storeDisk = fakeDrv "store-disk" { };
      };
      macvtapFds = { };
      inherit (microvmLib) withDriveLetters extractOptValues extractParamValue;
      linuxTarget = "bzImage";
    };
  guests = lib.mapAttrs (_: vm: vm.config.config) host.microvm.vms;
  qemuGuests = lib.filterAttrs (_: g: g.microvm.hypervisor == "qemu") guests;
in
{
  inherit variant;
  vms = lib.mapAttrs (
    name: g:
    let
      command = builtins.tryEval (runnerOf name g).command;
    in
    {
      inherit (g.microvm) mem hotplugMem;
      machine = g.microvm.qemu.machine;
      runs = command.success;
      command = if command.success then command.value else null;
    }
  ) qemuGuests;
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) host.assertions);
  inherit (host) warnings;
}
