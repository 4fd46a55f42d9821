# NixOS VM test (flake `checks.<system>.nixos`, pkgs.testers.runNixOSTest):
# a host runs vmd from services.vmd with fake `microvm@` units (a sleep,
# no microvm.nix, no nested guests), and a client node reaches it over TCP
# with vmctl from programs.vmctl and the remote admin's certificate.
#
#   nix build .#checks.x86_64-linux.nixos -L
#
# Written for a machine with Nix and nixpkgs; it was not run where it was
# written (no nixpkgs offline there).
{ self }:
{
  name = "vmd";

  nodes.host =
    { pkgs, ... }:
    {
      imports = [ self.nixosModules.host ];
      networking.firewall.enable = true;

      # Stand-ins for microvm.nix's units: vmd starts and stops them over
      # D-Bus exactly as it would real ones.
      systemd.services."microvm@" = {
        description = "fake MicroVM '%i'";
        serviceConfig.ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
      };
      systemd.targets.microvms.wantedBy = [ "multi-user.target" ];

      services.vmd = {
        enable = true;
        listen.tcp = {
          enable = true;
          openFirewall = true;
        };
        vms.fake-a = {
          description = "a fake VM";
          vcpus = 1;
          memoryMib = 256;
          vsockCid = 3;
        };
        vms.fake-b = {
          protected = true;
          vsockCid = 4;
        };
        clients.admin = {
          role = "admin";
          vms = [ "*" ];
          transports = [ "tcp" ];
        };
        clients.panel = {
          role = "operator";
          vms = [ "fake-a" ];
          vm = "fake-a";
        };
      };
    };

  nodes.client =
    { ... }:
    {
      imports = [ self.nixosModules.guest ];
      programs.vmctl = {
        enable = true;
        endpoints = [ "tcp://host:9876" ];
      };
    };

  testScript = ''
    start_all()

    with subtest("vmd is up as a notify service after its PKI"):
        host.wait_for_unit("vmd.service")
        host.succeed("test \"$(systemctl show -P Type vmd.service)\" = notify")
        host.succeed("systemctl show -P Result vmd-pki.service | grep -qx success")
        host.succeed("vmd check-config --config /etc/vmd/vmd.toml")

    with subtest("PKI: private keys 0600, the CA key unchanged by a second run"):
        for key in ["ca.key", "server.key", "clients/admin.key", "clients/panel.key"]:
            host.succeed(f"test \"$(stat -c %a /var/lib/vmd/pki/{key})\" = 600")
        before = host.succeed("sha256sum /var/lib/vmd/pki/ca.key /var/lib/vmd/pki/clients/admin.pem")
        host.succeed("systemctl start vmd-pki.service")
        assert before == host.succeed(
            "sha256sum /var/lib/vmd/pki/ca.key /var/lib/vmd/pki/clients/admin.pem"
        ), "vmd pki ensure rewrote a valid CA key or certificate"

    with subtest("the bound client's material is delivered, the CA key is not"):
        host.succeed("test \"$(stat -c %a /var/lib/vmd/guests/fake-a/client.key)\" = 640")
        host.succeed("cmp /var/lib/vmd/guests/fake-a/client.pem /var/lib/vmd/pki/clients/panel.pem")
        host.succeed("cmp /var/lib/vmd/guests/fake-a/ca.pem /var/lib/vmd/pki/ca.pem")
        files = host.succeed("ls -A /var/lib/vmd/guests/fake-a").split()
        assert sorted(files) == ["ca.pem", "client.key", "client.pem"], files

    with subtest("a remote admin over TCP"):
        host.succeed(
            "cp /var/lib/vmd/pki/ca.pem /var/lib/vmd/pki/clients/admin.pem"
            " /var/lib/vmd/pki/clients/admin.key /tmp/shared/"
        )
        client.succeed(
            "install -d /etc/vmd/tls"
            " && install -m 0644 /tmp/shared/ca.pem /etc/vmd/tls/ca.pem"
            " && install -m 0644 /tmp/shared/admin.pem /etc/vmd/tls/client.pem"
            " && install -m 0600 /tmp/shared/admin.key /etc/vmd/tls/client.key"
        )
        client.wait_until_succeeds("vmctl host", timeout=60)
        listing = client.succeed("vmctl list --json")
        assert "fake-a" in listing and "fake-b" in listing, listing

    with subtest("start and stop go through systemd (or are refused without KVM)"):
        if host.execute("test -e /dev/kvm")[0] == 0:
            client.succeed("vmctl start fake-a --wait")
            host.wait_for_unit("microvm@fake-a.service")
            client.succeed("vmctl stop fake-a --wait")
            host.wait_until_fails("systemctl is-active microvm@fake-a.service")
        else:
            out = client.fail("vmctl start fake-a 2>&1")
            assert "unsupported" in out.lower(), out
        out = client.fail("vmctl start fake-b 2>&1")
        assert "protected" in out.lower() or "forbidden" in out.lower(), out

    with subtest("reload is RELOADING=1 then READY=1: the unit stays active"):
        host.succeed("systemctl reload vmd.service")
        host.succeed("systemctl is-active vmd.service")
        client.succeed("vmctl host")
  '';
}
