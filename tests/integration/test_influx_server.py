"""The session InfluxDB answers: a written point reads back (guards the fixture itself)."""


def test_write_and_read_back(influxdb, influx_db):
    status, text = influxdb.write(influx_db, b'm,device=d1 v=1.5,uid="a" 1700000000000000000')
    assert status == 204, text
    rows = influxdb.rows("SELECT v, uid FROM m", influx_db)
    assert rows == [{"time": 1700000000000000000, "v": 1.5, "uid": "a"}]
