"""``python manage.py loadbalancer run|status|migrate|verify|resync|check`` (same as ``djangoloadbalancer``)."""
import argparse

from django.core.management.base import BaseCommand

from django_lb_shm import cli


class Command(BaseCommand):
    help = ("Run the load balancer coordinator, show its status, migrate, verify or resync the load-balanced "
            "databases.")
    requires_system_checks = []  # `run`, `migrate` and `verify` run them and refuse to start on errors

    def add_arguments(self, parser):
        parser.add_argument("subcommand_args", nargs=argparse.REMAINDER,
                            help="run | status [--json] [--watch [SECONDS]] | migrate [...] | verify [...] | "
                                 "resync ALIAS [--from SOURCE] [...] | check")

    def handle(self, *args, **options):
        def steps() -> int:
            return cli.dispatch(cli.parse_args(cli.build_parser("manage.py loadbalancer"), options["subcommand_args"]))

        code = cli.quiet_on_broken_pipe(steps)
        if code:
            raise SystemExit(code)
