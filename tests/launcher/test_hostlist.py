"""SLURM hostlist expressions: expansion order, zero padding, and one-line errors naming the input."""
import pytest

from launcher.hostlist import HostlistError, expand_hostlist


@pytest.mark.parametrize("text, expected", [
    ("gpu01", ["gpu01"]),
    ("a,b,c", ["a", "b", "c"]),
    ("gpu[001-004,010],cpu7", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "cpu7"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[9-10]", ["n9", "n10"]),
    ("n[10-12]", ["n10", "n11", "n12"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[0-2]", ["n0", "n1", "n2"]),
    ("n[3-3]", ["n3"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("r[1-2][3-4]", ["r13", "r14", "r23", "r24"]),
    ("a[1-2]b[1-2]c", ["a1b1c", "a1b2c", "a2b1c", "a2b2c"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("node-a.b[1-2]", ["node-a.b1", "node-a.b2"]),
    ("rack1-n[1-2].ib0", ["rack1-n1.ib0", "rack1-n2.ib0"]),
    ("x[5]", ["x5"]),
    ("x[007]", ["x007"]),
    ("x[1,3-4,7]", ["x1", "x3", "x4", "x7"]),
    ("a[1-2],b[3-4],c", ["a1", "a2", "b3", "b4", "c"]),
    ("gpu[01-02],gpu[05]", ["gpu01", "gpu02", "gpu05"]),
    ("login,gpu[1,3],cpu[10-11]", ["login", "gpu1", "gpu3", "cpu10", "cpu11"]),
])
def test_expand_hostlist(text, expected):
    assert expand_hostlist(text) == expected


def test_padding_grows_past_the_width_of_the_low_bound():
    hosts = expand_hostlist("n[001-1000]")
    assert len(hosts) == 1000
    assert hosts[:2] == ["n001", "n002"]
    assert hosts[98:100] == ["n099", "n100"]
    assert hosts[-2:] == ["n999", "n1000"]


@pytest.mark.parametrize("text", [
    "gpu[1-",
    "gpu[1-2",
    "gpu]",
    "g[1-2]]",
    "g]1[",
    "g[3-1]",
    "g[a-b]",
    "g[]",
    "g[1,]",
    "g[-1]",
    "g[1-2-3]",
    "a,,b",
    "a,",
    ",a",
    "",
    "g[[1]]",
    "a b",
    "a ,b",
    "g[1 -2]",
    "a\nb",
])
def test_malformed_hostlist_fails_with_one_line_naming_it(text):
    with pytest.raises(HostlistError) as info:
        expand_hostlist(text)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert repr(text) in message
    assert "\n" not in message


def test_hostlist_error_is_a_value_error():
    with pytest.raises(ValueError, match="malformed hostlist"):
        expand_hostlist("g[3-1]")


@pytest.mark.parametrize("text", ["   ", " g[[1]] ", "g[1 "])
def test_malformed_hostlist_with_outer_whitespace_names_the_whole_input(text):
    with pytest.raises(HostlistError) as info:
        expand_hostlist(text)
    assert repr(text) in str(info.value)
