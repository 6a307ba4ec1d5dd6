"""The install path works: pymesos on the pure-Python http-parser, and mesoshttp, import and run."""

import subprocess
import sys


def test_pymesos_imports_with_pure_python_http_parser():
    """pymesos imports, and http_parser falls back to its pure-Python parser (no C build on 3.11+)."""
    # A subprocess: importing pymesos installs a SIGINT handler we keep out of pytest's process.
    code = (
        "import pymesos, http_parser.http, http_parser.pyparser;"
        "assert http_parser.http.HttpParser is http_parser.pyparser.HttpParser"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_pure_python_parser_reads_a_chunked_subscribe_response():
    """The pure-Python parser reads a chunked response with Mesos-Stream-Id, as pymesos needs."""
    from http_parser.http import HttpParser

    data = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nMesos-Stream-Id: s-1\r\n\r\n"
        b"3\r\n20\n\r\n14\r\n{\"type\":\"HEARTBEAT\"}\r\n"
    )
    parser = HttpParser()
    assert parser.execute(data, len(data)) == len(data)
    assert parser.get_status_code() == 200
    assert parser.get_headers()["Mesos-Stream-Id"] == "s-1"
    assert parser.is_chunked()
    assert parser.recv_body() == b'20\n{"type":"HEARTBEAT"}'


def test_mesoshttp_imports():
    """mesoshttp 0.4.2 imports with its dependencies."""
    from mesoshttp.client import MesosClient

    assert MesosClient
