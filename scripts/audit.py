"""pip-audit over the installed dependencies of .venv (the versions constraints.txt pins): exits 1 when a
package has a known vulnerability with a fixed release, and says how many packages it could audit.

    python3 scripts/audit.py PIP_AUDIT [SITE_PACKAGES]

Packages that the vulnerability service does not know (or a service that cannot be reached) are counted and
named in the summary, not treated as safe: the line says how much was audited.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    pip_audit = sys.argv[1]
    site = sys.argv[2] if len(sys.argv) > 2 else glob.glob(".venv/lib/python3*/site-packages")[0]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "audit.json"
        done = subprocess.run([pip_audit, "--path", site, "--skip-editable", "--progress-spinner", "off",
                               "--format", "json", "--output", str(report)], capture_output=True, text=True,
                              timeout=600)
        if not report.is_file():
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            print(f"pip-audit: the vulnerability service could not be reached; nothing was audited ({reason})")
            return 0
        deps = json.loads(report.read_text())["dependencies"]
    skipped = [d["name"] for d in deps if d.get("skip_reason")]
    fixable = [(d["name"], d["version"], v["id"], v["fix_versions"]) for d in deps for v in d.get("vulns", [])
               if v.get("fix_versions")]
    unfixed = sum(1 for d in deps for v in d.get("vulns", []) if not v.get("fix_versions"))
    for name, version, vuln, fixes in fixable:
        print(f"pip-audit: {name} {version}: {vuln}, fixed in {', '.join(fixes)}")
    print(f"pip-audit: {len(deps) - len(skipped)} of {len(deps)} packages audited"
          + (f" ({len(skipped)} unknown to the vulnerability service, e.g. {', '.join(skipped[:3])})" if skipped else "")
          + f"; {len(fixable)} known vulnerabilities with a fix, {unfixed} without one")
    return 1 if fixable else 0


if __name__ == "__main__":
    sys.exit(main())
