# flake.nix of the host configuration
{
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    microvm.url = "github:microvm-nix/microvm.nix";
    microvm.inputs.nixpkgs.follows = "nixpkgs";
    vmd.url = "github:tiiuae/vmd";
    vmd.inputs.nixpkgs.follows = "nixpkgs";
  };
  outputs = { nixpkgs, microvm, vmd, ... }: {
    nixosConfigurations.ghaf-host = nixpkgs.lib.nixosSystem {
      system = "x86_64-linux";
      modules = [
        microvm.nixosModules.host
        vmd.nixosModules.host
        {
          networking.hostName = "ghaf-host";

          microvm.vms.net-vm.config = {
            microvm.vsock.cid = 5;            # declared: kept as it is
            microvm.vcpu = 1;
            microvm.mem = 512;
          };
          microvm.vms.gui-vm.config = {
            imports = [ vmd.nixosModules.guest ];
            microvm.vcpu = 4;                 # no CID: services.vmd assigns one (100)
            microvm.mem = 3072;               # not 2048: QEMU hangs with exactly 2 GiB
            microvm.hotplugMem = 1024;        # virtio-mem: max_memory_mib = 4096
            microvm.qemu.machine = "q35";     # x86_64's default, `microvm`, has no virtio-mem
            programs.vmctl.enable = true;     # /etc/vmd/client.toml: endpoints = ["auto"]
          };

          services.vmd = {
            enable = true;
            listen.tcp = {
              enable = true;
              address = "10.0.0.1";           # also a SAN of the server certificate
              openFirewall = true;
            };
            vms.net-vm = {
              protected = true;               # visible, never changed over the network
              description = "network VM";
            };
            vms.gui-vm.description = "GUI VM";
            clients.gui-vm = {                # the panel in the GUI VM
              role = "operator";
              vms = [ "gui-vm" ];
              vm = "gui-vm";                  # bound to its CID; files shared into it
            };
            clients.admin-laptop = {          # a remote admin
              role = "admin";
              vms = [ "*" ];
              transports = [ "tcp" ];
              tcpNetworks = [ "10.0.0.0/24" ];
            };
          };
        }
      ];
    };
  };
}
