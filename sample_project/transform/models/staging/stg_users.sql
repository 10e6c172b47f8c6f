-- One row per user, typed and without the Singer bookkeeping columns.
select
    cast(id as bigint) as user_id,
    email,
    name,
    country,
    plan,
    signed_up_at
from {{ source('raw', 'users') }}
