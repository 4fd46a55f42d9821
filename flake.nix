{
  description = "vmd: VM information and control for Ghaf KVM hosts (daemon, vmctl, NixOS modules)";

  # No flake.lock is committed: it cannot be generated offline where this
  # was written. Run `nix flake lock` once.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems =
        f:
        lib.genAttrs systems (
          system:
          f (
            import nixpkgs {
              inherit system;
              overlays = [ self.overlays.default ];
            }
          )
        );
      # The modules default to this flake's package for the host's system.
      withPackage =
        module: option:
        { lib, pkgs, ... }:
        {
          imports = [ module ];
          config = lib.setAttrByPath option (
            lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.vmd
          );
        };
    in
    {
      overlays.default = final: _prev: {
        vmd = final.callPackage ./nixos-modules/package.nix { };
      };

      packages = forAllSystems (pkgs: {
        inherit (pkgs) vmd;
        # vmd, vmctl and the GUI VM's GTK4 panel.
        vmd-panel = pkgs.vmd.override { panel = true; };
        default = pkgs.vmd;
      });

      nixosModules = {
        host = withPackage ./nixos-modules/host.nix [
          "services"
          "vmd"
          "package"
        ];
        guest = withPackage ./nixos-modules/guest.nix [
          "programs"
          "vmctl"
          "package"
        ];
        default = self.nixosModules.host;
      };

      checks = forAllSystems (pkgs: {
        vmd = pkgs.vmd;
        # A host running vmd with fake microvm@ units, and a client node.
        nixos = pkgs.testers.runNixOSTest (import ./nixos-modules/tests/vm-test.nix { inherit self; });
        # The evaluation test of ./nixos-modules/tests/run, against this
        # nixpkgs' lib instead of NIXPKGS_LIB.
        eval =
          let
            result = import ./nixos-modules/tests/eval.nix { inherit lib; };
          in
          pkgs.runCommand "vmd-nixos-modules-eval" { } (
            if result.failures == [ ] then
              "echo ${toString (builtins.length result.checked)} checks passed > $out"
            else
              throw ("vmd module evaluation checks failed:\n" + lib.concatStringsSep "\n" result.failures)
          );
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
