from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
about: dict = {}
exec((HERE / "django_lb_shm" / "__about__.py").read_text(), about)

setup(
    name="django-lb-shm",
    version=about["__version__"],
    description=(
        "Load-balance a Django project's ORM work over several copies of the same "
        "database through one shared-memory multiprocessing coordinator."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["django_lb_shm", "django_lb_shm.*"]),
    include_package_data=True,
    package_data={"django_lb_shm": ["py.typed"]},   # PEP 561: the package ships its type hints
    install_requires=[
        "Django>=4.2,<6.0",
        "cloudpickle>=2.0",
        "psutil>=5.9",
    ],
    extras_require={
        "postgres": ["psycopg[binary]>=3.1"],
        "metrics": ["prometheus_client>=0.17"],
        # wheel: tests/test_packaging.py builds and installs the package offline (setuptools < 70.1 needs it)
        "test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6", "psycopg[binary]>=3.1",
                 "prometheus_client>=0.17", "wheel>=0.38"],
        "chart": ["matplotlib>=3.5"],
    },
    # `djangoloadbalancer` is generated from the entry point; bin/djangoloadbalancer (the same
    # launcher) is for a checkout, and djangoloadbalancer.py is the seed README's name for it.
    entry_points={"console_scripts": ["djangoloadbalancer = django_lb_shm.cli:main"]},
    scripts=["bin/djangoloadbalancer.py"],
    classifiers=[
        "Framework :: Django",
        "Typing :: Typed",
        "Framework :: Django :: 4.2",
        "Framework :: Django :: 5.2",
        "Programming Language :: Python :: 3",
        "Topic :: Database",
    ],
)
