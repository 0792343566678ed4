#!/usr/bin/env python3
"""Raw S3 calls the archive tests make against SeaweedFS, independently of auditrail's own
object_store client: create an Object Lock bucket, read, overwrite or delete an object, and try
to delete a locked object version. The endpoint and credentials come from AWS_ENDPOINT,
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.

Usage: s3_admin.py create-locked BUCKET DAYS | get BUCKET KEY FILE | put BUCKET KEY FILE
       | delete BUCKET KEY | delete-version BUCKET KEY
"""
import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def client():
    return boto3.client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT"],
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def main(argv):
    s3 = client()
    cmd, bucket = argv[1], argv[2]
    if cmd == "create-locked":
        s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        s3.put_object_lock_configuration(
            Bucket=bucket,
            ObjectLockConfiguration={
                "ObjectLockEnabled": "Enabled",
                "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": int(argv[3])}},
            },
        )
    elif cmd == "head":
        s3.head_bucket(Bucket=bucket)
    elif cmd == "get":
        with open(argv[4], "wb") as f:
            f.write(s3.get_object(Bucket=bucket, Key=argv[3])["Body"].read())
    elif cmd == "put":
        with open(argv[4], "rb") as f:
            s3.put_object(Bucket=bucket, Key=argv[3], Body=f.read())
    elif cmd == "delete":
        s3.delete_object(Bucket=bucket, Key=argv[3])
    elif cmd == "delete-version":
        head = s3.head_object(Bucket=bucket, Key=argv[3])
        print("lock", head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate"))
        try:
            s3.delete_object(Bucket=bucket, Key=argv[3], VersionId=head["VersionId"])
        except ClientError as e:
            print("refused", e.response["Error"]["Code"])
            return 0
        print("deleted")
        return 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
