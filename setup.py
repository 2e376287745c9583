"""Build the package from `settings.ini` (the nbdev 2 layout).

nbdev's template imports `pkg_resources`, which recent setuptools no longer ships;
this one parses versions with `packaging` instead.
"""
from configparser import ConfigParser
import setuptools
from packaging.version import Version

assert Version(setuptools.__version__) >= Version("36.2")

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

for key in "version description keywords author author_email".split():
    assert key in cfg, f"settings.ini is missing `{key}`"

licenses = {"apache2": "Apache-2.0", "mit": "MIT"}   # settings.ini's name -> the SPDX identifier (the License classifiers are deprecated)
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable", "6 - Mature", "7 - Inactive"]
py_versions = "3.9 3.10 3.11 3.12 3.13".split()

lic = licenses.get(cfg["license"].lower(), cfg["license"])
min_python = cfg["min_python"]
requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
extras = {k[: -len("_requirements")]: v.split() for k, v in cfg.items()
          if k.endswith("_requirements") and k not in ("dev_requirements",)}     # tracking_requirements -> [tracking]
extras["all"] = sorted({r for reqs in extras.values() for r in reqs})
extras["dev"] = dev_requirements + extras["all"]
console_scripts = cfg.get("console_scripts", "").split()

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    license=lic,
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"]) - 1],
        "Intended Audience :: " + cfg["audience"].title(),
        "Natural Language :: " + cfg["language"].title(),
    ]
    + ["Programming Language :: Python :: " + v for v in py_versions[py_versions.index(min_python):]],
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require=extras,
    python_requires=">=" + min_python,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    description=cfg["description"],
    keywords=cfg["keywords"],
    zip_safe=False,
    entry_points={
        "console_scripts": console_scripts,
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
)
