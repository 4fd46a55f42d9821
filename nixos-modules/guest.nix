# programs.vmctl: vmctl inside a guest VM, configured to reach the host's vmd
# over vsock (CID 2) first. The certificate, key and CA come from the host's
# read-only share (services.vmd.clients.<name>.vm), mounted at `tlsDir`.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    types
    mkOption
    mkEnableOption
    mkIf
    literalExpression
    ;
  cfg = config.programs.vmctl;
  format = pkgs.formats.toml { };

  # client.toml's key for the TCP endpoint `auto` falls back to.
  autoTcpKey = "auto_tcp";

  clientConfig = {
    inherit (cfg) endpoints;
    ca = "${cfg.tlsDir}/ca.pem";
    cert = "${cfg.tlsDir}/client.pem";
    key = "${cfg.tlsDir}/client.key";
    server_name = cfg.serverName;
  }
  // lib.optionalAttrs (cfg.hostAddress != null) {
    ${autoTcpKey} = "tcp://${cfg.hostAddress}";
  }
  // lib.optionalAttrs (cfg.connectTimeoutMs != null) { connect_timeout_ms = cfg.connectTimeoutMs; };
in
{
  options.programs.vmctl = {
    enable = mkEnableOption "vmctl, the client of the host's vmd";

    package = mkOption {
      type = types.package;
      default = pkgs.vmd;
      defaultText = literalExpression "pkgs.vmd";
      description = "The package that provides `vmctl`.";
    };

    endpoints = mkOption {
      type = types.listOf types.str;
      default = [ "auto" ];
      example = [
        "vsock://2:9876"
        "tcp://10.0.0.1:9876"
      ];
      description = ''
        Where vmctl connects, in order. `auto` is vsock to the host (CID 2,
        port 9876), then TCP.
      '';
    };

    hostAddress = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "192.168.100.1:9876";
      description = ''
        `HOST:PORT` (IPv6 in brackets) that `auto` falls back to over TCP
        when vsock fails, rendered as `${autoTcpKey} = "tcp://HOST:PORT"`.
        null: vmctl's built-in fallback, loopback.
      '';
    };

    tlsDir = mkOption {
      type = types.str;
      default = "/etc/vmd/tls";
      description = ''
        Directory with `ca.pem`, `client.pem` and `client.key`: the host
        module's share (`services.vmd.guestMountPoint`).
      '';
    };

    serverName = mkOption {
      type = types.str;
      default = "vmd";
      description = "The name the server certificate must carry.";
    };

    connectTimeoutMs = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      description = "Bound on each connection step, in milliseconds (null: vmctl's default).";
    };

    panel = {
      enable = mkEnableOption ''
        vmd-panel, the desktop panel of the GUI VM (a GTK4 window with each
        VM's state, graphs and actions). It reads the same
        /etc/vmd/client.toml as vmctl'';

      package = mkOption {
        type = types.package;
        default = cfg.package.override { panel = true; };
        defaultText = literalExpression "config.programs.vmctl.package.override { panel = true; }";
        description = "The package that provides `vmd-panel` and `vmctl` (the vmd package built with `panel = true`); installed instead of `package`.";
      };
    };
  };

  config = mkIf cfg.enable {
    # The panel's package holds vmctl too: install one or the other.
    environment.systemPackages = [ (if cfg.panel.enable then cfg.panel.package else cfg.package) ];
    environment.etc."vmd/client.toml".source = format.generate "client.toml" clientConfig;
  };
}
