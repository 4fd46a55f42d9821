#!/usr/bin/python3
"""Reads and drives a running application through the AT-SPI
accessibility tree (what a screen reader sees), for the GUI tests.

Run it with Debian's /usr/bin/python3 (python3-pyatspi), with
DBUS_SESSION_BUS_ADDRESS (and DISPLAY) of the application's session.

  atspi.py dump APP           every accessible: depth, role, name, states
  atspi.py click APP NAME     do the first action ("click") of the
                              accessible named NAME (exactly)
  atspi.py set APP NAME VALUE set the value of the accessible named NAME
                              (a spin button, a slider) to VALUE

APP is the application's name on the accessibility bus (its prgname).
Exit codes: 0 done; 1 APP or NAME not found, or the action failed;
2 usage.
"""

import sys

import pyatspi


def application(name):
    desktop = pyatspi.Registry.getDesktop(0)
    for i in range(desktop.childCount):
        app = desktop.getChildAtIndex(i)
        if app is not None and app.name == name:
            return app
    return None


def walk(node, depth=0, limit=4000):
    """Yields (depth, accessible) for the tree under node, depth first."""
    stack = [(node, depth)]
    seen = 0
    while stack and seen < limit:
        node, depth = stack.pop()
        seen += 1
        yield depth, node
        try:
            children = [node.getChildAtIndex(i) for i in range(node.childCount)]
        except Exception:  # a widget gone while walking
            continue
        for child in reversed(children):
            if child is not None:
                stack.append((child, depth + 1))


def states(node):
    try:
        state_set = node.getState()
        names = []
        for state in (pyatspi.STATE_SHOWING, pyatspi.STATE_SENSITIVE, pyatspi.STATE_ACTIVE):
            if state_set.contains(state):
                names.append(pyatspi.stateToString(state))
        return ",".join(names)
    except Exception:
        return ""


def dump(app):
    for depth, node in walk(app):
        try:
            role = node.getRoleName()
            name = node.name or ""
        except Exception:
            continue
        print(f"{depth}\t{role}\t{name}\t{states(node)}")
    return 0


def click(app, name):
    for _, node in walk(app):
        try:
            if node.name != name:
                continue
            action = node.queryAction()
        except NotImplementedError:
            continue
        except Exception:
            continue
        if action.nActions < 1:
            continue
        if action.doAction(0):
            print(f"clicked {name}")
            return 0
        print(f"{name}: the action failed", file=sys.stderr)
        return 1
    print(f"no accessible named {name!r} with an action", file=sys.stderr)
    return 1


def set_value(app, name, value):
    for _, node in walk(app):
        try:
            if node.name != name:
                continue
            node.queryValue().currentValue = value
        except NotImplementedError:
            continue
        except Exception:
            continue
        print(f"set {name} to {value}")
        return 0
    print(f"no accessible named {name!r} with a value", file=sys.stderr)
    return 1


def main(argv):
    if len(argv) < 3 or argv[1] not in ("dump", "click", "set"):
        print(__doc__, file=sys.stderr)
        return 2
    app = application(argv[2])
    if app is None:
        print(f"no application {argv[2]!r} on the accessibility bus", file=sys.stderr)
        return 1
    if argv[1] == "dump":
        return dump(app)
    if argv[1] == "set":
        if len(argv) != 5:
            print(__doc__, file=sys.stderr)
            return 2
        try:
            value = float(argv[4])
        except ValueError:
            print(f"not a number: {argv[4]!r}", file=sys.stderr)
            return 2
        return set_value(app, argv[3], value)
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    return click(app, argv[3])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
