"""Import and a single echo: the package is installed and its native core works."""

import iocpnative


def test_import_and_echo() -> None:
    assert isinstance(iocpnative.__version__, str)
    backends = iocpnative.available_backends()
    assert backends
    with iocpnative.Server(port=0, workers=1) as srv:
        assert srv.backend in backends
        with iocpnative.Client(port=srv.port) as cli:
            assert cli.request(b"No:1") == b"No:1"
    st = srv.stats()
    assert st.pool_in_use == 0
    assert st.pool_allocated == 0
