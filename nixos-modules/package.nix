# vmd and vmctl, built from this repository with its Cargo.lock; with
# `panel = true` (`pkgs.vmd.override { panel = true; }`) also vmd-panel, the
# GUI VM's GTK4 panel, which needs gtk4 and pkg-config.
{
  lib,
  rustPlatform,
  installShellFiles,

  panel ? false,
  pkg-config ? null,
  gtk4 ? null,
  wrapGAppsHook4 ? null,
}:
let
  root = ../.;
  cargoToml = lib.importTOML (root + "/Cargo.toml");
  manifest = cargoToml.workspace;
  workspace = manifest.package;
  # The release artefact is built with Cargo.toml's `dist` profile (fat LTO,
  # one codegen unit: the smaller daemon). buildRustPackage builds the
  # `release` profile, so its LTO and codegen units are overridden from
  # `dist` (read here, so the two cannot drift; tests/package-source
  # checks it).
  dist = cargoToml.profile.dist;
  # Every member, read from Cargo.toml: cargo reads each member's manifest
  # even to build one package, so a member left out breaks the build
  # (tests/package-source checks the selection with cargo itself).
  members = map (
    m:
    if builtins.match ".*[][*?].*" m != null then
      throw "nixos-modules/package.nix: workspace member glob ${m} is not supported; list the members"
    else
      root + "/${m}"
  ) manifest.members;
in
rustPlatform.buildRustPackage {
  pname = "vmd";
  inherit (workspace) version;

  # Only what cargo needs, so editing docs or Nix files does not rebuild.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions (
      [
        (root + "/Cargo.toml")
        (root + "/Cargo.lock")
      ]
      ++ members
    );
  };
  cargoLock.lockFile = root + "/Cargo.lock";

  env = {
    CARGO_PROFILE_RELEASE_LTO = dist.lto;
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS = toString dist.codegen-units;
  };

  # Plain `if`s, not lib.optionals: tests/package-source.nix reads this
  # file with a stub lib.
  # installShellFiles: vmctl's completions and man pages (postInstall).
  nativeBuildInputs = [
    installShellFiles
  ]
  ++ (
    if panel then
      [
        pkg-config
        wrapGAppsHook4
      ]
    else
      [ ]
  );
  buildInputs = if panel then [ gtk4 ] else [ ];

  cargoBuildFlags = [
    "-p"
    "vmd"
    "-p"
    "vmd-client"
  ]
  ++ (
    if panel then
      [
        "-p"
        "vmd-panel"
      ]
    else
      [ ]
  );
  # Unit tests of the crates that need nothing from the host. The daemon's
  # and the system suites need /dev/kvm, vsock, systemd or QEMU and run in
  # the repository's own CI (scripts/test) and in the NixOS VM test.
  cargoTestFlags = [
    "-p"
    "vmd-proto"
    "-p"
    "vmd-client"
    "--lib"
  ];

  # vmctl's completions and man pages, generated from its clap definitions
  # by the binary just built (`vmctl completions SHELL`, `vmctl man DIR`).
  postInstall = ''
    installShellCompletion --cmd vmctl \
      --bash <($out/bin/vmctl completions bash) \
      --zsh <($out/bin/vmctl completions zsh) \
      --fish <($out/bin/vmctl completions fish)
    mkdir -p vmctl-man
    $out/bin/vmctl man vmctl-man
    installManPage vmctl-man/*.1
  '';

  meta = {
    description = "VM information-and-control daemon (vmd) and client (vmctl) for Ghaf KVM hosts";
    homepage = "https://github.com/tiiuae/vmd";
    license = lib.licenses.asl20;
    mainProgram = "vmd";
    platforms = lib.platforms.linux;
  };
}
