"""A downstream for the Java service test: GET anything answers 200 {"available": true}
(no order id in it). Threads, keep-alive. Usage: stock.py PORT"""
import sys

from jsonhttp import JsonHandler, serve


class Handler(JsonHandler):
    disable_nagle_algorithm = True

    def do_GET(self):
        self.answer(200, {"available": True})


if __name__ == "__main__":
    serve(Handler, int(sys.argv[1]), announce=False)
