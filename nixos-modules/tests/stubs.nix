# STUBS FOR THE EVALUATION TEST ONLY: no nixpkgs here, so this file declares
# the few NixOS and microvm.nix options the vmd modules read or write, with
# the same types and merge behaviour where it matters, plus a fake `pkgs`.
# Nothing here is deployed; the flake's NixOS VM test uses the real thing.
{ lib }:
let
  inherit (lib) types mkOption;

  # A derivation-shaped value: `types.package` accepts it, interpolation
  # gives its store path.
  fakeDrv =
    name: extra:
    {
      type = "derivation";
      inherit name;
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
      meta.mainProgram = name;
    }
    // extra;

  # As nixpkgs' pkgs.formats.toml: the same value type; `generate` keeps
  # the value (`.value`) instead of running remarshal, so tests can read it.
  tomlFormat =
    { }:
    {
      type =
        let
          valueType =
            types.nullOr (
              types.oneOf [
                types.bool
                types.int
                types.float
                types.str
                types.path
                (types.attrsOf valueType)
                (types.listOf valueType)
              ]
            )
            // {
              description = "TOML value";
            };
        in
        valueType;
      generate = name: value: fakeDrv name { inherit value; };
    };

  unitType = types.submodule {
    freeformType = types.attrsOf types.anything;
    options = {
      description = mkOption {
        type = types.str;
        default = "";
      };
      documentation = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      wantedBy = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      requiredBy = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      before = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      after = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      requires = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      wants = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      path = mkOption {
        type = types.listOf types.anything;
        default = [ ];
      };
      restartTriggers = mkOption {
        type = types.listOf types.anything;
        default = [ ];
      };
      serviceConfig = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
      timerConfig = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
    };
  };
in
{
  pkgs = {
    # `override { panel = true; }` as package.nix's callPackage result has.
    vmd = fakeDrv "vmd" {
      override = args: fakeDrv (if args.panel or false then "vmd-panel" else "vmd") { };
    };
    coreutils = fakeDrv "coreutils" { };
    gnugrep = fakeDrv "gnugrep" { };
    formats.toml = tomlFormat;
    writeShellScript = name: text: fakeDrv name { inherit text; };
  };

  # NixOS option declarations the modules use (host and guest alike).
  nixos =
    { ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        networking.hostName = mkOption {
          type = types.str;
          default = "nixos";
        };
        networking.firewall.allowedTCPPorts = mkOption {
          type = types.listOf types.port;
          default = [ ];
        };
        environment.etc = mkOption {
          type = types.attrsOf (
            types.submodule {
              options.source = mkOption { type = types.anything; };
            }
          );
          default = { };
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        systemd.package = mkOption {
          type = types.package;
          default = fakeDrv "systemd" { };
        };
        systemd.services = mkOption {
          type = types.attrsOf unitType;
          default = { };
        };
        systemd.timers = mkOption {
          type = types.attrsOf unitType;
          default = { };
        };
        systemd.tmpfiles.settings = mkOption {
          type = types.attrsOf (types.attrsOf (types.attrsOf types.anything));
          default = { };
        };
      };
    };

  # microvm.nix's guest options the host module reads (nixos-modules/microvm/options.nix).
  microvmGuest =
    { config, ... }:
    {
      options.microvm = {
        hypervisor = mkOption {
          type = types.str;
          default = "qemu";
        };
        vcpu = mkOption {
          type = types.ints.positive;
          default = 1;
        };
        mem = mkOption {
          type = types.ints.positive;
          default = 512;
        };
        hotplugMem = mkOption {
          type = types.ints.unsigned;
          default = 0;
        };
        balloon = mkOption {
          type = types.bool;
          default = false;
        };
        initialBalloonMem = mkOption {
          type = types.ints.unsigned;
          default = 0;
        };
        # microvm.nix's default on x86_64-linux (mkDefault "microvm"; "virt"
        # on aarch64): these stubs stand for an x86_64 host.
        qemu.machine = mkOption {
          type = types.str;
          default = "microvm";
        };
        qemu.extraArgs = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        socket = mkOption {
          type = types.nullOr types.str;
          default = "${config.networking.hostName}.sock";
        };
        vsock.cid = mkOption {
          type = types.nullOr types.int;
          default = null;
        };
        shares = mkOption {
          type = types.listOf (
            types.submodule {
              options = {
                tag = mkOption { type = types.str; };
                source = mkOption { type = types.str; };
                mountPoint = mkOption { type = types.str; };
                proto = mkOption {
                  type = types.enum [
                    "9p"
                    "virtiofs"
                  ];
                  default = "9p";
                };
                readOnly = mkOption {
                  type = types.bool;
                  default = false;
                };
              };
            }
          );
          default = [ ];
        };
      };
    };

  # microvm.nix's host options (nixos-modules/host/options.nix): `config`
  # merges its definitions into a NixOS evaluation of the guest, with
  # `extraModules` added, as microvm.nix's eval-config call does.
  microvmHost =
    guestModules:
    { ... }:
    {
      options.microvm = {
        host.enable = mkOption {
          type = types.bool;
          default = true;
        };
        stateDir = mkOption {
          type = types.str;
          default = "/var/lib/microvms";
        };
        vms = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule (
              { name, config, ... }:
              {
                options = {
                  config = mkOption {
                    default = null;
                    type = types.nullOr (
                      lib.mkOptionType {
                        name = "Toplevel NixOS config";
                        merge =
                          loc: defs:
                          lib.evalModules {
                            modules = guestModules ++ [
                              { networking.hostName = lib.mkDefault name; }
                            ]
                            ++ config.extraModules
                            ++ map (x: x.value) defs;
                          };
                      }
                    );
                  };
                  evaluatedConfig = mkOption {
                    default = null;
                    type = types.nullOr types.unspecified;
                  };
                  flake = mkOption {
                    default = null;
                    type = types.nullOr types.unspecified;
                  };
                  extraModules = mkOption {
                    type = types.listOf types.deferredModule;
                    default = [ ];
                  };
                  autostart = mkOption {
                    type = types.bool;
                    default = true;
                  };
                };
              }
            )
          );
        };
      };
    };
}
