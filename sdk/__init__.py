"""kvferry's Python SDK: talk to a frontend's ZeroMQ SDK endpoint.

    from sdk import Client
    with Client("tcp://127.0.0.1:17101") as c:
        print(c.generate(prompt="Hello", max_tokens=16).text)

See sdk/README.md.
"""

from sdk.client import (
    AsyncClient,
    Chunk,
    Client,
    GenerateTimeout,
    InvalidRequest,
    Overloaded,
    Result,
    SdkError,
    Unauthorized,
    Unavailable,
    curve_keys_from_dir,
)

__all__ = ["AsyncClient", "Chunk", "Client", "GenerateTimeout", "InvalidRequest", "Overloaded", "Result", "SdkError",
           "Unauthorized", "Unavailable", "curve_keys_from_dir"]
