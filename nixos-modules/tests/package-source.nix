# The files nixos-modules/package.nix hands to cargo (its `src`), for
# ./package-source. Evaluates package.nix with a stub `rustPlatform` and,
#
#  - with `nixpkgsLib` (nixpkgs' lib directory): nixpkgs' real lib, whose
#    `fileset.toSource` is replaced by one that keeps the file set, listed
#    with `lib.fileset.toList` (exactly the files Nix would copy, before
#    a flake's git filter);
#  - without it (CI has no nixpkgs): a STUB lib that implements only what
#    package.nix uses (`importTOML`, `fileset.unions`, `fileset.toSource`)
#    and keeps the selected paths (files, or directories meaning every
#    file under them). A new lib function in package.nix fails here
#    loudly ("attribute missing"): add it to the stub.
#
# Returns { lib = "nixpkgs" | "stub"; paths = [ "relative/path" … ];
#           buildPackages = [ … ]; testPackages = [ … ]; env = { … }; }
{
  nixpkgsLib ? null,
}:
let
  root = ../..;
  rootStr = toString root;
  relative =
    p:
    let
      s = toString p;
      n = builtins.stringLength rootStr;
    in
    if s == rootStr then
      "."
    else if builtins.substring 0 (n + 1) s == "${rootStr}/" then
      builtins.substring (n + 1) (-1) s
    else
      throw "package.nix selects ${s}, outside the repository";

  # What package.nix passes to buildRustPackage, with src = { root; fileset; }.
  rustPlatform.buildRustPackage = args: args;
  keepFileset = { root, fileset }: { inherit root fileset; };

  # nixpkgs' lib reads file types with builtins.readFileType (Nix 2.14);
  # Debian's Nix 2.8 lacks it: give the lib a stand-in built on readDir.
  scope = {
    builtins = builtins // {
      readFileType = builtins.readFileType or (p: (builtins.readDir (dirOf p)).${baseNameOf p});
    };
    import = scopedImport scope;
  };
  real = scopedImport scope nixpkgsLib;
  realLib = real // {
    fileset = real.fileset // {
      toSource = keepFileset;
    };
  };

  stubLib = {
    importTOML = file: builtins.fromTOML (builtins.readFile file);
    fileset = {
      # A stub file set is { _paths = [ path … ]; }; a path is a file set.
      unions = sets: { _paths = builtins.concatMap (s: if builtins.isPath s then [ s ] else s._paths) sets; };
      toSource = keepFileset;
    };
  };

  pkgArgs =
    lib:
    import ../package.nix {
      inherit lib rustPlatform;
      installShellFiles = "installShellFiles";
    };
  pkg = pkgArgs (if nixpkgsLib == null then stubLib else realLib);
  selected =
    if nixpkgsLib == null then
      pkg.src.fileset._paths
    else
      realLib.fileset.toList pkg.src.fileset;

  # `-p NAME` pairs of cargo flags.
  packagesOf =
    flags:
    let
      n = builtins.length flags;
      idx = builtins.filter (i: builtins.elemAt flags i == "-p") (builtins.genList (i: i) (n - 1));
    in
    map (i: builtins.elemAt flags (i + 1)) idx;
in
assert pkg.src.root == root || throw "package.nix's src root is ${toString pkg.src.root}, not the repository";
{
  lib = if nixpkgsLib == null then "stub" else "nixpkgs";
  paths = map relative selected;
  buildPackages = packagesOf (pkg.cargoBuildFlags or [ ]);
  testPackages = packagesOf (pkg.cargoTestFlags or [ ]);
  env = pkg.env or { };
}
